package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/shoalhq/shoal/agent"
	"github.com/shoalhq/shoal/coordinator"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/shoalhq/shoal/spec"
	"github.com/urfave/cli/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

var coordinatorFlag = &cli.StringFlag{Name: "coordinator", Value: "127.0.0.1:7950", EnvVars: []string{"SHOAL_COORDINATOR"},
	Usage: "coordinator API address"}

// dialCoordinator connects the CLI to the coordinator with its credentials.
func dialCoordinator(c *cli.Context) (*grpc.ClientConn, string, error) {
	addr := c.String("coordinator")
	tl, err := cliTLS(c)
	if err != nil {
		return nil, addr, err
	}
	conn, err := tl.Dial(addr)
	if err != nil {
		return nil, addr, fmt.Errorf("coordinator address %q: %w", addr, err)
	}
	return conn, addr, nil
}

// withClient dials the coordinator and maps gRPC errors to plain messages.
// With a list of servers (a replicated coordinator) it asks them in turn
// while the answer is Unavailable (down, or no leader on its side of a
// partition); a read answered from a server's last, unconfirmed state is
// said to be so on stderr.
func withClient(c *cli.Context, f func(context.Context, coordv1.CoordinatorClient) error) error {
	all := c.String("coordinator")
	var addrs []string
	for _, a := range strings.Split(all, ",") {
		if a = strings.TrimSpace(a); a != "" {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		return errors.New("no coordinator address: set --coordinator or SHOAL_COORDINATOR")
	}
	tl, err := cliTLS(c)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(c.Context, 15*time.Second)
	defer cancel()
	var stale string
	warn := grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, inv grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		var md metadata.MD
		err := inv(ctx, method, req, reply, cc, append(opts, grpc.Header(&md))...)
		if v := md.Get(coordinator.StaleHeader); len(v) > 0 {
			stale = v[0]
		}
		return err
	})
	for i, addr := range addrs {
		conn, err := grpc.NewClient(addr, append(tl.DialOptions(), warn)...)
		if err != nil {
			return fmt.Errorf("coordinator address %q: %w", addr, err)
		}
		err = f(ctx, coordv1.NewCoordinatorClient(conn))
		conn.Close()
		if status.Code(err) == codes.Unavailable && i+1 < len(addrs) && ctx.Err() == nil {
			continue
		}
		if stale != "" && err == nil {
			fmt.Fprintf(c.App.ErrWriter, "warning: %s answered from its last state, which it could not confirm current (%s)\n", addr, stale)
		}
		if len(addrs) > 1 {
			addr = all
		}
		return clientError(addr, err)
	}
	return nil
}

// clientError turns a gRPC error from the coordinator into a plain message.
func clientError(addr string, err error) error {
	if st, ok := status.FromError(err); ok && err != nil {
		switch st.Code() {
		case codes.Unavailable:
			if msg := st.Message(); strings.Contains(msg, "coordinator leader") {
				return errors.New(msg) // the coordinators answered: no leader, or it changed
			}
			return fmt.Errorf("cannot reach the coordinator at %s (or the node behind it): is `shoal coordinator` running? (set --coordinator or SHOAL_COORDINATOR): %s", addr, st.Message())
		case codes.DeadlineExceeded:
			return fmt.Errorf("the coordinator at %s did not answer in time", addr)
		default:
			return errors.New(st.Message())
		}
	}
	return err
}

func applyCommand() *cli.Command {
	return &cli.Command{
		Name:      "apply",
		Usage:     "create or update a deployment from a YAML spec",
		ArgsUsage: "-f FILE",
		Flags:     clusterFlags(&cli.StringFlag{Name: "filename", Aliases: []string{"f"}, Required: true, Usage: "spec file, or - for stdin"}),
		Action: func(c *cli.Context) error {
			var data []byte
			var err error
			if f := c.String("filename"); f == "-" {
				data, err = io.ReadAll(os.Stdin)
			} else {
				data, err = os.ReadFile(f)
			}
			if err != nil {
				return err
			}
			// Validate locally first: the same rules, with no round trip.
			if _, err := spec.Parse(data); err != nil {
				return err
			}
			return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
				resp, err := cl.Apply(ctx, &coordv1.ApplyRequest{SpecYaml: data})
				if err != nil {
					return err
				}
				verb := "configured"
				if resp.Created {
					verb = "created"
				}
				fmt.Fprintf(c.App.Writer, "deployment/%s %s\n", resp.Name, verb)
				for _, w := range resp.Warnings {
					fmt.Fprintf(c.App.ErrWriter, "warning: %s\n", w)
				}
				return nil
			})
		},
	}
}

var outputFlag = &cli.StringFlag{Name: "output", Aliases: []string{"o"}, Value: "table", Usage: "table or json"}

func printJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}

func table(w io.Writer, header string, rows [][]string) {
	tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

func age(unix int64) string {
	if unix == 0 {
		return "-"
	}
	d := time.Since(time.Unix(unix, 0)).Round(time.Second)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func getCommand() *cli.Command {
	sub := func(name string, aliases []string, usage string, run func(c *cli.Context, ctx context.Context, cl coordv1.CoordinatorClient, json bool) error) *cli.Command {
		return &cli.Command{Name: name, Aliases: aliases, Usage: usage, Flags: clusterFlags(outputFlag),
			Action: func(c *cli.Context) error {
				o := c.String("output")
				if o != "json" && o != "table" {
					return fmt.Errorf("--output %q: use table or json", o)
				}
				return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error { return run(c, ctx, cl, o == "json") })
			}}
	}
	return &cli.Command{
		Name:      "get",
		Usage:     "list nodes, deployments or replicas",
		ArgsUsage: "nodes|deployments|replicas|coordinators [-o json]",
		Action: func(c *cli.Context) error {
			return fmt.Errorf("get what? one of: nodes, deployments, replicas, coordinators (got %q)", c.Args().First())
		},
		Subcommands: []*cli.Command{
			sub("coordinators", []string{"coordinator", "servers"}, "list the coordinator servers (the Raft group) and their state",
				func(c *cli.Context, ctx context.Context, cl coordv1.CoordinatorClient, json bool) error {
					resp, err := cl.Coordinators(ctx, &coordv1.CoordinatorsRequest{})
					if err != nil {
						return err
					}
					if json {
						return printJSON(c.App.Writer, resp)
					}
					printCoordinators(c.App.Writer, resp)
					return nil
				}),
			sub("nodes", []string{"node", "no"}, "list the agents in the cluster", func(c *cli.Context, ctx context.Context, cl coordv1.CoordinatorClient, json bool) error {
				resp, err := cl.ListNodes(ctx, &coordv1.ListNodesRequest{})
				if err != nil {
					return err
				}
				if json {
					return printJSON(c.App.Writer, resp)
				}
				var rows [][]string
				for _, n := range resp.Nodes {
					rdma := dash(n.Rdma)
					rows = append(rows, []string{n.NodeId, n.Address, fmt.Sprintf("%d×%s %dG", n.GpuCount, dash(n.GpuModel), n.GpuMemoryGib), rdma,
						n.State, dash(n.GroupId), epoch(n.Epoch), dash(n.Role), dash(strings.TrimSpace(n.EngineState + " " + n.Progress))})
				}
				table(c.App.Writer, "NODE\tADDRESS\tGPUS\tRDMA\tSTATE\tREPLICA\tEPOCH\tROLE\tENGINE", rows)
				return nil
			}),
			sub("deployments", []string{"deployment", "deploy"}, "list deployments", func(c *cli.Context, ctx context.Context, cl coordv1.CoordinatorClient, json bool) error {
				resp, err := cl.ListDeployments(ctx, &coordv1.ListDeploymentsRequest{})
				if err != nil {
					return err
				}
				if json {
					return printJSON(c.App.Writer, resp)
				}
				var rows [][]string
				for _, d := range resp.Deployments {
					rows = append(rows, []string{d.Name, d.Model, d.Engine, fmt.Sprintf("%d/%d", d.ReadyReplicas, d.DesiredReplicas),
						fmt.Sprint(d.NodesPerReplica), age(d.CreatedUnix)})
				}
				table(c.App.Writer, "NAME\tMODEL\tENGINE\tREADY\tNODES/REPLICA\tAGE", rows)
				return nil
			}),
			sub("replicas", []string{"replica"}, "list replica groups [of one deployment]", func(c *cli.Context, ctx context.Context, cl coordv1.CoordinatorClient, json bool) error {
				resp, err := cl.ListReplicas(ctx, &coordv1.ListReplicasRequest{Deployment: c.Args().First()})
				if err != nil {
					return err
				}
				if json {
					return printJSON(c.App.Writer, resp)
				}
				table(c.App.Writer, "REPLICA\tDEPLOYMENT\tEPOCH\tSTATE\tHEAD\tENDPOINT\tMEMBERS\tRUNNING\tWAITING\tKV\tSPEC", replicaRows(resp.Replicas))
				return nil
			}),
		},
	}
}

func epoch(e uint64) string {
	if e == 0 {
		return "-"
	}
	return fmt.Sprint(e)
}

func replicaRows(rs []*coordv1.ReplicaInfo) [][]string {
	var rows [][]string
	for _, r := range rs {
		state := r.State
		if r.GroupId == "" && r.SlurmJob != "" { // a Slurm job no replica runs on yet
			state = fmt.Sprintf("%s (%s, waited %v)", r.State, r.SlurmReason, time.Duration(r.SlurmWaitSeconds)*time.Second)
			rows = append(rows, []string{"slurm-job/" + r.SlurmJob, r.Deployment, "-", state, "-", "-", dash(strings.Join(r.Members, ",")), "-", "-", "-", "-"})
			continue
		}
		if r.SlurmJob != "" && r.SlurmEndsUnix > 0 {
			state += fmt.Sprintf(" (job %s ends %s)", r.SlurmJob, time.Unix(r.SlurmEndsUnix, 0).UTC().Format(time.TimeOnly))
		} else if r.SlurmJob != "" {
			state += " (job " + r.SlurmJob + ")"
		}
		if r.Progress != "" {
			state = strings.ToUpper(state) + " " + r.Progress
		}
		if r.Outdated {
			state += " (outdated)" // a rollout replaces it
		}
		rows = append(rows, []string{r.GroupId, r.Deployment, epoch(r.Epoch), state, dash(r.Head), dash(r.Endpoint),
			strings.Join(r.Members, ","), fmt.Sprintf("%.0f", r.NumRequestsRunning), fmt.Sprintf("%.0f", r.NumRequestsWaiting),
			fmt.Sprintf("%.0f%%", 100*r.KvCacheUsage), dash(r.Spec)})
	}
	return rows
}

func describeCommand() *cli.Command {
	return &cli.Command{
		Name:      "describe",
		Usage:     "show a deployment (fields, replicas, events) or a node (GPUs, RDMA, health reasons) in detail",
		ArgsUsage: "deployment NAME | node NAME",
		Flags:     clusterFlags(),
		Action: func(c *cli.Context) error {
			if c.Args().First() == "node" && c.Args().Get(1) != "" {
				return describeNode(c, c.Args().Get(1))
			}
			if c.Args().First() != "deployment" || c.Args().Get(1) == "" {
				return errors.New("usage: shoal describe deployment NAME | shoal describe node NAME")
			}
			return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
				d, err := cl.DescribeDeployment(ctx, &coordv1.DescribeDeploymentRequest{Name: c.Args().Get(1)})
				if err != nil {
					return err
				}
				w := c.App.Writer
				s := d.Summary
				fmt.Fprintf(w, "Name:      %s\nModel:     %s\nEngine:    %s\nReplicas:  %d ready / %d desired, %d node(s) each\nAge:       %s\n\nSpec:\n",
					s.Name, s.Model, s.Engine, s.ReadyReplicas, s.DesiredReplicas, s.NodesPerReplica, age(s.CreatedUnix))
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				for _, f := range d.Fields {
					note := ""
					if !f.Implemented {
						note = "(accepted, not implemented yet)"
					}
					fmt.Fprintf(tw, "  %s\t%s\t%s\n", f.Path, f.Value, note)
				}
				tw.Flush()
				if d.EngineSettings != "" {
					fmt.Fprintf(w, "\nEngine settings: %s (a replica whose SPEC differs runs older ones and is replaced by a rollout: `shoal rollout status %s`)\n", d.EngineSettings, s.Name)
				}
				if d.Autoscaler != "" {
					fmt.Fprintf(w, "\nAutoscaler: %s\n", d.Autoscaler)
				}
				if d.Hold != "" {
					fmt.Fprintf(w, "\nCoordinator: %s\n", d.Hold)
				}
				fmt.Fprintln(w, "\nReplicas:")
				if len(d.Replicas) == 0 {
					fmt.Fprintln(w, "  (none)")
				} else {
					table(w, "  REPLICA\tDEPLOYMENT\tEPOCH\tSTATE\tHEAD\tENDPOINT\tMEMBERS\tRUNNING\tWAITING\tKV\tSPEC", indent(replicaRows(d.Replicas)))
				}
				for _, r := range d.Replicas {
					if len(r.Ranks) == 0 {
						continue
					}
					fmt.Fprintf(w, "\nDP ranks of %s (routers pick a rank; a rank failing stops the group):\n", r.GroupId)
					var rows [][]string
					for _, k := range r.Ranks {
						rows = append(rows, []string{strconv.Itoa(int(k.Rank)), k.Endpoint, fmt.Sprintf("%.0f", k.NumRequestsRunning),
							fmt.Sprintf("%.0f", k.NumRequestsWaiting), fmt.Sprintf("%.0f%%", 100*k.KvCacheUsage)})
					}
					table(w, "  RANK\tENDPOINT\tRUNNING\tWAITING\tKV", indent(rows))
				}
				if len(d.Adapters) > 0 {
					fmt.Fprintln(w, "\nAdapters:")
					printAdapters(w, d.Adapters)
				}
				fmt.Fprintln(w, "\nEvents:")
				if len(d.Events) == 0 {
					fmt.Fprintln(w, "  (none)")
				}
				for _, e := range d.Events {
					fmt.Fprintln(w, "  "+e)
				}
				return nil
			})
		},
	}
}

func indent(rows [][]string) [][]string {
	for _, r := range rows {
		r[0] = "  " + r[0]
	}
	return rows
}

func deleteCommand() *cli.Command {
	return &cli.Command{
		Name:      "delete",
		Usage:     "delete a deployment (its replicas are stopped and their nodes released)",
		ArgsUsage: "deployment NAME",
		Flags:     clusterFlags(),
		Action: func(c *cli.Context) error {
			if c.Args().First() != "deployment" || c.Args().Get(1) == "" {
				return errors.New("usage: shoal delete deployment NAME")
			}
			return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
				if _, err := cl.DeleteDeployment(ctx, &coordv1.DeleteDeploymentRequest{Name: c.Args().Get(1)}); err != nil {
					return err
				}
				fmt.Fprintf(c.App.Writer, "deployment/%s deleted\n", c.Args().Get(1))
				return nil
			})
		},
	}
}

func describeNode(c *cli.Context, id string) error {
	return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
		resp, err := cl.DescribeNode(ctx, &coordv1.DescribeNodeRequest{NodeId: id})
		if err != nil {
			return err
		}
		n := resp.Node
		w := c.App.Writer
		fmt.Fprintf(w, "Node:      %s (%s)\nState:     %s\nReplica:   %s epoch %s, role %s, engine %s\n\n",
			n.NodeId, n.Address, n.State, dash(n.GroupId), epoch(n.Epoch), dash(n.Role), dash(n.EngineState))
		if n.SlurmJob != "" {
			fmt.Fprintf(w, "Slurm:     job %s on %s", n.SlurmJob, dash(n.SlurmNodes))
			if n.SlurmEndsUnix > 0 {
				fmt.Fprintf(w, ", ends %s", time.Unix(n.SlurmEndsUnix, 0).UTC().Format(time.RFC3339))
			}
			fmt.Fprintf(w, ", port band %d (ports +%d)", n.PortBand, n.PortBand*100)
			if n.Leaving {
				fmt.Fprint(w, ", LEAVING (Slurm signalled the job)")
			}
			fmt.Fprint(w, "\n\n")
		}
		var hw agent.HostInventory
		if err := json.Unmarshal(resp.InventoryJson, &hw); err != nil || hw.GPU == nil {
			return fmt.Errorf("node %s sent no readable inventory (an older agent?)", id)
		}
		printInventory(w, &hw, verdict(&hw))
		for _, ev := range hw.Events {
			fmt.Fprintf(w, "GPU event: GPU %d (%s): %s\n", ev.Index, ev.UUID, ev.Reason)
		}
		return nil
	})
}

func logsCommand() *cli.Command {
	return &cli.Command{
		Name:      "logs",
		Usage:     "print a replica's engine logs (the head's by default)",
		ArgsUsage: "REPLICA",
		Flags: clusterFlags(
			&cli.StringFlag{Name: "node", Usage: "member node id (default: the head)"},
			&cli.StringFlag{Name: "name", Usage: "one log: ray, vllm, python3, … (default: all)"},
			&cli.BoolFlag{Name: "follow", Aliases: []string{"F"}, Usage: "keep printing what is appended"},
			&cli.Int64Flag{Name: "tail", Value: 64 << 10, Usage: "bytes of each log to print first"},
		),
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return errors.New("usage: shoal logs REPLICA [--node N] [--name vllm] [--follow]")
			}
			conn, addr, err := dialCoordinator(c)
			if err != nil {
				return err
			}
			defer conn.Close()
			// No deadline: --follow streams until Ctrl-C.
			st, err := coordv1.NewCoordinatorClient(conn).Logs(c.Context, &coordv1.LogsRequest{Replica: c.Args().First(),
				NodeId: c.String("node"), Name: c.String("name"), Follow: c.Bool("follow"), TailBytes: c.Int64("tail")})
			if err != nil {
				return clientError(addr, err)
			}
			last := ""
			for {
				ch, err := st.Recv()
				if errors.Is(err, io.EOF) || (err != nil && c.Context.Err() != nil) {
					return nil
				}
				if err != nil {
					return clientError(addr, err)
				}
				if key := ch.NodeId + "/" + ch.Name; key != last {
					fmt.Fprintf(c.App.Writer, "==> %s %s.log <==\n", ch.NodeId, ch.Name)
					last = key
				}
				_, _ = c.App.Writer.Write(ch.Data)
			}
		},
	}
}
