package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"

	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/urfave/cli/v2"
)

// adapterCommand adds, removes and lists a deployment's LoRA adapters at
// run time (docs/design/adapters.md).
func adapterCommand() *cli.Command {
	change := func(c *cli.Context, req *coordv1.ChangeAdaptersRequest, verb string) error {
		return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
			resp, err := cl.ChangeAdapters(ctx, req)
			if err != nil {
				return err
			}
			for _, w := range resp.Warnings {
				fmt.Fprintln(c.App.ErrWriter, "warning:", w)
			}
			var names []string
			for _, a := range req.Add {
				names = append(names, a.Name)
			}
			names = append(names, req.Remove...)
			fmt.Fprintf(c.App.Writer, "deployment/%s: adapter(s) %s %s (%d in all); `shoal adapter list %s` shows where they load\n",
				req.Deployment, strings.Join(names, ", "), verb, resp.Adapters, req.Deployment)
			return nil
		})
	}
	return &cli.Command{
		Name:  "adapter",
		Usage: "a deployment's LoRA adapters, changed while it serves: add, remove, list",
		Subcommands: []*cli.Command{{
			Name:      "add",
			Usage:     "add an adapter: clients call it by NAME as the model; replicas load it as its traffic needs",
			ArgsUsage: "DEPLOYMENT NAME",
			Flags: clusterFlags(
				&cli.StringFlag{Name: "source", Required: true, Usage: "the adapter's weights: hf://org/name[@rev], s3://bucket/prefix, gs://bucket/prefix or a path on every host"},
				&cli.IntFlag{Name: "rank", Required: true, Usage: "its LoRA rank (adapter_config.json \"r\"), at most the deployment's engine.lora.maxLoraRank"},
				&cli.IntFlag{Name: "max-replicas", Usage: "at most this many replicas hold it at once (0: any number)"}),
			Action: func(c *cli.Context) error {
				if c.NArg() != 2 {
					return fmt.Errorf("usage: shoal adapter add DEPLOYMENT NAME --source URI --rank R [--max-replicas N]")
				}
				return change(c, &coordv1.ChangeAdaptersRequest{Deployment: c.Args().Get(0), Add: []*coordv1.AdapterInfo{{
					Name: c.Args().Get(1), Source: c.String("source"), Rank: int32(c.Int("rank")), MaxReplicas: int32(c.Int("max-replicas"))}}}, "added")
			},
		}, {
			Name:      "remove",
			Usage:     "remove adapters: every replica unloads them, and requests naming them get 404",
			ArgsUsage: "DEPLOYMENT NAME...",
			Flags:     clusterFlags(),
			Action: func(c *cli.Context) error {
				if c.NArg() < 2 {
					return fmt.Errorf("usage: shoal adapter remove DEPLOYMENT NAME...")
				}
				return change(c, &coordv1.ChangeAdaptersRequest{Deployment: c.Args().Get(0), Remove: c.Args().Slice()[1:]}, "removed")
			},
		}, {
			Name:      "list",
			Usage:     "the deployment's adapters and their state on each replica",
			ArgsUsage: "DEPLOYMENT",
			Flags:     clusterFlags(outputFlag),
			Action: func(c *cli.Context) error {
				if c.NArg() != 1 {
					return fmt.Errorf("usage: shoal adapter list DEPLOYMENT")
				}
				return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
					resp, err := cl.ListAdapters(ctx, &coordv1.ListAdaptersRequest{Deployment: c.Args().First()})
					if err != nil {
						return err
					}
					if c.String("output") == "json" {
						return printJSON(c.App.Writer, resp)
					}
					fmt.Fprintf(c.App.Writer, "%d adapter(s); %d replica(s) with %d slots each\n", len(resp.Adapters), resp.Replicas, resp.Slots)
					printAdapters(c.App.Writer, resp.Adapters)
					return nil
				})
			},
		}},
	}
}

// printAdapters is the adapters table: one row per adapter, where it is.
func printAdapters(w io.Writer, ads []*coordv1.AdapterInfo) {
	if len(ads) == 0 {
		fmt.Fprintln(w, "  (none)")
		return
	}
	var rows [][]string
	for _, a := range ads {
		bound := "any"
		if a.MaxReplicas > 0 {
			bound = strconv.Itoa(int(a.MaxReplicas))
		}
		var where []string
		loaded := 0
		for _, r := range a.Replicas {
			s := r.GroupId + ":" + r.State
			if r.State == "" {
				s = r.GroupId + ":pinned"
			} else if r.Pinned {
				s += "*"
			}
			if r.State == "loaded" {
				loaded++
			}
			if r.Reason != "" {
				s += " (" + r.Reason + ")"
			}
			where = append(where, s)
		}
		if len(where) == 0 {
			where = []string{"-"}
		}
		rows = append(rows, []string{a.Name, strconv.Itoa(int(a.Rank)), bound, strconv.Itoa(loaded), strings.Join(where, ", "), a.Source})
	}
	table(w, "  ADAPTER\tRANK\tMAX\tLOADED\tREPLICAS (* pinned)\tSOURCE", indent(rows))
}
