package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/urfave/cli/v2"

	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
)

// operatorCommand: the replicated coordinator's operations (the Raft group
// and its snapshots).
func operatorCommand() *cli.Command {
	return &cli.Command{
		Name:  "operator",
		Usage: "operate the coordinators: the Raft group's servers, store snapshots",
		Subcommands: []*cli.Command{
			{
				Name:  "raft",
				Usage: "the coordinators' Raft group",
				Subcommands: []*cli.Command{
					{Name: "list-peers", Usage: "the servers, their Raft addresses, who leads", Flags: clusterFlags(),
						Action: func(c *cli.Context) error {
							return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
								resp, err := cl.Coordinators(ctx, &coordv1.CoordinatorsRequest{})
								if err != nil {
									return err
								}
								printCoordinators(c.App.Writer, resp)
								return nil
							})
						}},
					{Name: "add-peer", ArgsUsage: "NODE_ID RAFT_ADDR", Usage: "add a server as a voter (start it first with --raft-addr and no --servers)", Flags: clusterFlags(),
						Action: func(c *cli.Context) error {
							if c.NArg() != 2 {
								return errors.New("usage: shoal operator raft add-peer NODE_ID RAFT_ADDR")
							}
							return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
								resp, err := cl.RaftAddPeer(ctx, &coordv1.RaftAddPeerRequest{NodeId: c.Args().Get(0), RaftAddr: c.Args().Get(1)})
								if err != nil {
									return err
								}
								fmt.Fprintln(c.App.Writer, resp.Message)
								return nil
							})
						}},
					{Name: "remove-peer", ArgsUsage: "NODE_ID", Usage: "remove a server from the group (a dead one, or before retiring it)", Flags: clusterFlags(),
						Action: func(c *cli.Context) error {
							if c.NArg() != 1 {
								return errors.New("usage: shoal operator raft remove-peer NODE_ID")
							}
							return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
								resp, err := cl.RaftRemovePeer(ctx, &coordv1.RaftRemovePeerRequest{NodeId: c.Args().First()})
								if err != nil {
									return err
								}
								fmt.Fprintln(c.App.Writer, resp.Message)
								return nil
							})
						}},
				},
			},
			{
				Name:  "snapshot",
				Usage: "save the coordinators' store to a file, or restore it from one",
				Subcommands: []*cli.Command{
					{Name: "save", ArgsUsage: "FILE", Usage: "write the store (deployments, replica groups) to FILE", Flags: clusterFlags(),
						Action: func(c *cli.Context) error {
							if c.NArg() != 1 {
								return errors.New("usage: shoal operator snapshot save FILE")
							}
							return snapshotSave(c, c.Args().First())
						}},
					{Name: "restore", ArgsUsage: "FILE", Usage: "replace the store with a saved one of the same cluster (on the leader)", Flags: clusterFlags(),
						Action: func(c *cli.Context) error {
							if c.NArg() != 1 {
								return errors.New("usage: shoal operator snapshot restore FILE")
							}
							return snapshotRestore(c, c.Args().First())
						}},
				},
			},
		},
	}
}

func printCoordinators(w io.Writer, resp *coordv1.CoordinatorsResponse) {
	var rows [][]string
	for _, s := range resp.Servers {
		role := "follower"
		if s.Leader {
			role = "leader"
		}
		if !s.Voter {
			role += " (non-voter)"
		}
		alive := "alive"
		if !s.Alive {
			alive = "not in gossip"
		}
		rows = append(rows, []string{s.NodeId, dash(s.RaftAddr), dash(s.ApiAddr), role, alive})
	}
	table(w, "SERVER\tRAFT\tAPI\tROLE\tGOSSIP", rows)
	if !resp.Replicated {
		fmt.Fprintf(w, "\na single coordinator (not replicated): start three or five with --raft-addr and --servers for no single point of failure\n")
		return
	}
	leader := resp.Leader
	if leader == "" {
		leader = "none (no quorum)"
	}
	fmt.Fprintf(w, "\nanswered by %s (%s): leader %s, term %d, commit index %d, applied %d (lag %d)",
		resp.AnsweredBy, resp.State, leader, resp.Term, resp.CommitIndex, resp.AppliedIndex, int64(resp.CommitIndex)-int64(resp.AppliedIndex))
	if resp.LastContactMs > 0 {
		fmt.Fprintf(w, ", leader last heard %v ago", time.Duration(resp.LastContactMs)*time.Millisecond)
	}
	fmt.Fprintln(w)
}

func snapshotSave(c *cli.Context, path string) error {
	return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
		st, err := cl.SnapshotSave(ctx, &coordv1.SnapshotSaveRequest{})
		if err != nil {
			return err
		}
		tmp, err := os.CreateTemp(filepath.Dir(path), ".shoal-snapshot-*")
		if err != nil {
			return err
		}
		defer os.Remove(tmp.Name())
		n := 0
		for {
			m, err := st.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				tmp.Close()
				return err
			}
			w, err := tmp.Write(m.Data)
			n += w
			if err != nil {
				tmp.Close()
				return err
			}
		}
		if n == 0 {
			tmp.Close()
			return errors.New("the coordinator sent an empty snapshot")
		}
		if err := tmp.Sync(); err != nil {
			tmp.Close()
			return err
		}
		if err := tmp.Close(); err != nil {
			return err
		}
		if err := os.Rename(tmp.Name(), path); err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "saved the store to %s (%d bytes)\n", path, n)
		return nil
	})
}

func snapshotRestore(c *cli.Context, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
		st, err := cl.SnapshotRestore(ctx)
		if err != nil {
			return err
		}
		for len(b) > 0 {
			n := min(len(b), 1<<20)
			if err := st.Send(&coordv1.SnapshotChunk{Data: b[:n]}); err != nil {
				break // the server's answer says why
			}
			b = b[n:]
		}
		resp, err := st.CloseAndRecv()
		if err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "restored %d deployment(s) and %d replica group(s) from %s\n", resp.Deployments, resp.Groups, path)
		return nil
	})
}
