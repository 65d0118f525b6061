package main

import (
	"context"
	"fmt"

	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/urfave/cli/v2"
)

// rolloutCommand shows a deployment's rollout and takes its last engine
// change back.
func rolloutCommand() *cli.Command {
	// withDeployment describes the deployment named on the command line and
	// hands it on.
	withDeployment := func(c *cli.Context, f func(ctx context.Context, cl coordv1.CoordinatorClient, d *coordv1.DescribeDeploymentResponse) error) error {
		n := c.Args().First()
		if n == "" {
			return fmt.Errorf("usage: shoal rollout %s DEPLOYMENT", c.Command.Name)
		}
		return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
			d, err := cl.DescribeDeployment(ctx, &coordv1.DescribeDeploymentRequest{Name: n})
			if err != nil {
				return err
			}
			return f(ctx, cl, d)
		})
	}
	return &cli.Command{
		Name:  "rollout",
		Usage: "a deployment's rollout of changed engine settings: status, undo",
		Subcommands: []*cli.Command{{
			Name:      "status",
			Usage:     "how many replicas run the deployment's current engine settings",
			ArgsUsage: "DEPLOYMENT",
			Flags:     clusterFlags(),
			Action: func(c *cli.Context) error {
				return withDeployment(c, func(_ context.Context, _ coordv1.CoordinatorClient, d *coordv1.DescribeDeploymentResponse) error {
					fmt.Fprintln(c.App.Writer, rolloutStatus(d))
					return nil
				})
			},
		}, {
			Name:      "undo",
			Usage:     "apply the deployment's spec from before its last change of engine settings (a rollout back)",
			ArgsUsage: "DEPLOYMENT",
			Flags:     clusterFlags(),
			Action: func(c *cli.Context) error {
				return withDeployment(c, func(ctx context.Context, cl coordv1.CoordinatorClient, d *coordv1.DescribeDeploymentResponse) error {
					n := c.Args().First()
					if d.PreviousSpecYaml == "" {
						return fmt.Errorf("deployment %s has no earlier engine settings to go back to", n)
					}
					resp, err := cl.Apply(ctx, &coordv1.ApplyRequest{SpecYaml: []byte(d.PreviousSpecYaml)})
					if err != nil {
						return err
					}
					for _, w := range resp.Warnings {
						fmt.Fprintln(c.App.ErrWriter, "warning:", w)
					}
					fmt.Fprintf(c.App.Writer, "deployment/%s rolled back to its previous engine settings\n", n)
					return nil
				})
			},
		}},
	}
}

// rolloutStatus says how far a deployment's rollout is.
func rolloutStatus(d *coordv1.DescribeDeploymentResponse) string {
	updated, ready, outdated, draining := 0, 0, 0, 0
	for _, r := range d.Replicas {
		switch {
		case r.GroupId == "" && r.SlurmJob != "":
			continue // a Slurm job no replica runs on yet
		case r.State == "draining":
			draining++
		case r.Outdated:
			outdated++
		default:
			updated++
			if r.State == "ready" {
				ready++
			}
		}
	}
	name := d.Summary.GetName()
	if outdated == 0 && draining == 0 && ready == updated {
		return fmt.Sprintf("deployment %s: every replica (%d) runs the current engine settings and is ready", name, updated)
	}
	return fmt.Sprintf("deployment %s: rolling out — %d replica(s) with the current engine settings (%d ready), %d outdated, %d draining",
		name, updated, ready, outdated, draining)
}
