package main

import (
	"fmt"
	"log/slog"
	"runtime"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/urfave/cli/v2"
)

// sdReady tells systemd (Type=notify) that the daemon is ready; outside
// systemd (no NOTIFY_SOCKET) it does nothing.
func sdReady(log *slog.Logger) func() {
	return func() {
		if ok, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
			log.Warn("systemd notify", "err", err)
		} else if ok {
			log.Info("told systemd: ready")
		}
	}
}

func sdStopping() { _, _ = daemon.SdNotify(false, daemon.SdNotifyStopping) }

func versionCommand() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print the version",
		Action: func(c *cli.Context) error {
			fmt.Fprintf(c.App.Writer, "shoal %s (%s, %s/%s)\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
			return nil
		},
	}
}
