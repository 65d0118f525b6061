package main

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/shoalhq/shoal/gossip"
	"github.com/shoalhq/shoal/internal/secretfile"
	coordv1 "github.com/shoalhq/shoal/proto/coordinator/v1"
	"github.com/shoalhq/shoal/security"
	"github.com/urfave/cli/v2"
)

// Defaults where a packaged install keeps its secrets: /etc/shoal, or
// SHOAL_CONFIG_DIR (another prefix; tests, which must not see the host's).
var (
	configDir       = cmp.Or(os.Getenv("SHOAL_CONFIG_DIR"), "/etc/shoal")
	defaultTLSDir   = filepath.Join(configDir, "tls")
	defaultGossipKF = filepath.Join(configDir, "gossip.key")
	defaultAPIKeys  = filepath.Join(configDir, "api-keys.yaml")
)

// securityFlags are every daemon's transport-security flags.
func securityFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "tls-dir", Value: defaultTLSDir, EnvVars: []string{"SHOAL_TLS_DIR"}, Usage: "directory with ca.pem, ROLE.pem and ROLE-key.pem (`shoal tls`)"},
		&cli.StringFlag{Name: "tls-ca", EnvVars: []string{"SHOAL_TLS_CA"}, Usage: "CA certificate (default TLS_DIR/ca.pem)"},
		&cli.StringFlag{Name: "tls-cert", EnvVars: []string{"SHOAL_TLS_CERT"}, Usage: "this daemon's certificate (default TLS_DIR/ROLE.pem)"},
		&cli.StringFlag{Name: "tls-key", EnvVars: []string{"SHOAL_TLS_KEY"}, Usage: "its key (default TLS_DIR/ROLE-key.pem)"},
		&cli.StringFlag{Name: "gossip-key-file", EnvVars: []string{"SHOAL_GOSSIP_KEY_FILE"}, Usage: "gossip encryption keys, one base64 key per line (default " + defaultGossipKF + " if present; `shoal keyring generate`)"},
		&cli.BoolFlag{Name: "insecure", EnvVars: []string{"SHOAL_INSECURE"}, Usage: "allow cleartext gRPC and unencrypted gossip when no certificate or key is configured (trusted networks only)"},
	}
}

// daemonSecurity loads a daemon's TLS material and gossip keys. Without them
// it refuses to start unless --insecure was given, and then says so loudly.
// keyFile is the gossip key file the daemon's config file names ("" if
// none): --gossip-key-file wins over it, and it over the default path.
// SIGHUP reloads the certificates (and calls reload, if given).
func daemonSecurity(c *cli.Context, role security.Role, log *slog.Logger, reload func(), keyFile string) (*security.TLS, [][]byte, string, error) {
	insecure := c.Bool("insecure")
	tl, err := security.Load(security.Options{Dir: c.String("tls-dir"), CA: c.String("tls-ca"), Cert: c.String("tls-cert"), Key: c.String("tls-key"), Role: role})
	if err != nil {
		if !insecure {
			return nil, nil, "", fmt.Errorf("%w\nshoal does not run in the clear by default: create a CA and certificates with `shoal tls ca create` and `shoal tls cert create --%s`, or pass --insecure on a trusted network", err, role)
		}
		tl = nil
	}
	kf := gossipKeyFile(c.String("gossip-key-file"), keyFile, defaultGossipKF)
	var keys [][]byte
	if kf != "" {
		if keys, err = gossip.LoadKeyFile(kf); err != nil {
			return nil, nil, "", err
		}
	} else if !insecure {
		return nil, nil, "", fmt.Errorf("gossip is not encrypted: create a key with `shoal keyring generate > %s` (the same file on every node) and pass --gossip-key-file, or pass --insecure on a trusted network", defaultGossipKF)
	}
	if tl == nil || keys == nil {
		log.Warn("INSECURE: running without TLS and/or gossip encryption because --insecure was given; any host that reaches these ports can join the cluster, assign work and read metrics",
			"tls", tl != nil, "gossip_encrypted", keys != nil)
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		for range hup {
			if tl != nil {
				if err := tl.Reload(); err != nil {
					log.Error("SIGHUP: certificates not reloaded; keeping the old ones", "err", err)
				} else {
					log.Info("SIGHUP: certificates reloaded")
				}
			}
			if reload != nil {
				reload()
			}
		}
	}()
	return tl, keys, kf, nil
}

// gossipKeyFile is the gossip key file a daemon uses: the flag's, else its
// config file's, else the default path when it exists.
func gossipKeyFile(flag, config, def string) string {
	switch {
	case flag != "":
		return flag
	case config != "":
		return config
	}
	if _, err := os.Stat(def); err == nil {
		return def
	}
	return ""
}

// devPointer is where `shoal dev` leaves the path of its CLI credentials, so
// the CLI finds a local dev cluster with no configuration.
func devPointer() string { return filepath.Join(os.TempDir(), "shoal-dev-cli-tls") }

// cliTLS is the CLI's TLS: SHOAL_TLS_DIR, else ~/.shoal/tls, else
// /etc/shoal/tls, else a running `shoal dev`; a token may replace the
// certificate; --insecure speaks cleartext.
func cliTLS(c *cli.Context) (*security.TLS, error) {
	if c.Bool("insecure") {
		return nil, nil
	}
	dir := c.String("tls-dir")
	if dir == "" {
		home, _ := os.UserHomeDir()
		for _, d := range []string{filepath.Join(home, ".shoal", "tls"), defaultTLSDir} {
			if _, err := os.Stat(security.CAFile(d)); err == nil {
				dir = d
				break
			}
		}
	}
	if dir == "" {
		if b, err := os.ReadFile(devPointer()); err == nil {
			dir = string(b)
		}
	}
	if dir == "" {
		return nil, fmt.Errorf("no CLI credentials: set SHOAL_TLS_DIR to a directory with ca.pem and cli.pem/cli-key.pem (`shoal tls cert create --cli`), or ca.pem and SHOAL_TOKEN; or --insecure for a cleartext cluster")
	}
	tl, err := security.Load(security.Options{Dir: dir, Role: security.RoleCLI, CertOptional: true})
	if err != nil {
		return nil, err
	}
	tl.SetToken(c.String("token"))
	return tl, nil
}

// clusterFlags are the flags of every verb that talks to a cluster: where
// the coordinator is and the CLI's credentials (each also an env var; on
// the command line they may stand anywhere, see reorder).
func clusterFlags(more ...cli.Flag) []cli.Flag {
	return append([]cli.Flag{coordinatorFlag,
		&cli.StringFlag{Name: "tls-dir", EnvVars: []string{"SHOAL_TLS_DIR"}, Usage: "CLI credentials: ca.pem and cli.pem/cli-key.pem (default ~/.shoal/tls, /etc/shoal/tls)"},
		&cli.StringFlag{Name: "token", EnvVars: []string{"SHOAL_TOKEN"}, Usage: "CLI token instead of a certificate (`shoal tls token create`)"},
		&cli.BoolFlag{Name: "insecure", EnvVars: []string{"SHOAL_INSECURE"}, Usage: "talk to a cleartext (--insecure) cluster"},
	}, more...)
}

func tlsCommand() *cli.Command {
	roleFlags := []cli.Flag{}
	for _, r := range security.Roles {
		roleFlags = append(roleFlags, &cli.BoolFlag{Name: string(r), Usage: "a " + string(r) + " certificate"})
	}
	return &cli.Command{
		Name:  "tls",
		Usage: "create the cluster's CA, certificates and CLI tokens",
		Subcommands: []*cli.Command{
			{Name: "ca", Subcommands: []*cli.Command{{
				Name: "create", Usage: "create a CA (ca.pem, ca-key.pem); keep ca-key.pem off the GPU hosts",
				Flags: []cli.Flag{&cli.StringFlag{Name: "out", Value: ".", Usage: "directory"}, &cli.StringFlag{Name: "cluster", Value: "shoal"}},
				Action: func(c *cli.Context) error {
					if err := security.CreateCA(c.String("out"), c.String("cluster")); err != nil {
						return err
					}
					fmt.Fprintf(c.App.Writer, "created %s and %s\n", security.CAFile(c.String("out")), security.CAKeyFile(c.String("out")))
					return nil
				}}}},
			{Name: "cert", Subcommands: []*cli.Command{{
				Name: "create", Usage: "sign a certificate for one role: --coordinator, --agent, --router or --cli",
				Flags: append(roleFlags,
					&cli.StringFlag{Name: "name", Usage: "node id or user name (required)"},
					&cli.StringSliceFlag{Name: "ip", Usage: "address peers dial (agents, coordinator); repeatable"},
					&cli.StringSliceFlag{Name: "dns", Usage: "DNS name peers dial; repeatable"},
					&cli.StringFlag{Name: "ca-dir", Value: ".", Usage: "directory with ca.pem and ca-key.pem"},
					&cli.StringFlag{Name: "out", Value: ".", Usage: "directory for ROLE.pem, ROLE-key.pem and ca.pem"},
					&cli.IntFlag{Name: "days", Value: 365}),
				Action: func(c *cli.Context) error {
					var role security.Role
					for _, r := range security.Roles {
						if c.Bool(string(r)) {
							if role != "" {
								return fmt.Errorf("give one role, not --%s and --%s", role, r)
							}
							role = r
						}
					}
					if role == "" {
						return fmt.Errorf("which role? one of --coordinator, --agent, --router, --cli")
					}
					if c.Int("days") < 1 || c.Int("days") > 3650 {
						return fmt.Errorf("--days: 1 to 3650")
					}
					req := security.CertRequest{Role: role, Name: c.String("name"), IPs: c.StringSlice("ip"), DNS: c.StringSlice("dns"),
						Lifetime: time.Duration(c.Int("days")) * 24 * time.Hour}
					if (role == security.RoleAgent || role == security.RoleCoordinator) && len(req.IPs)+len(req.DNS) == 0 {
						return fmt.Errorf("--%s certificates need the address peers dial: --ip (repeatable) or --dns", role)
					}
					if err := security.CreateCert(c.String("ca-dir"), c.String("out"), req); err != nil {
						return err
					}
					fmt.Fprintf(c.App.Writer, "created %s and %s\n", security.CertFile(c.String("out"), role), security.KeyFile(c.String("out"), role))
					return nil
				}}}},
			{Name: "token", Subcommands: []*cli.Command{{
				Name: "create", Usage: "make a CLI token; its hash goes into the coordinator's --cli-tokens-file", ArgsUsage: "NAME",
				Action: func(c *cli.Context) error {
					tok, line, err := security.NewToken(c.Args().First())
					if err != nil {
						return err
					}
					fmt.Fprintf(c.App.Writer, "%s\n", tok)
					fmt.Fprintf(c.App.ErrWriter, "add this line to the coordinator's --cli-tokens-file (the token itself is not stored):\n%s\n", line)
					return nil
				}}}},
		},
	}
}

func keyringCommand() *cli.Command {
	change := func(op string) *cli.Command {
		return &cli.Command{
			Name: op, ArgsUsage: "KEY", Flags: clusterFlags(),
			Usage: map[string]string{"install": "add a key on every node (accepted, not yet used to send)",
				"use": "make an installed key the one every node sends with", "remove": "drop a key that is no longer primary anywhere"}[op],
			Action: func(c *cli.Context) error {
				if c.NArg() != 1 {
					return fmt.Errorf("usage: shoal keyring %s KEY", op)
				}
				return keyringCall(c, op, c.Args().First())
			},
		}
	}
	return &cli.Command{
		Name:  "keyring",
		Usage: "gossip encryption keys: generate one, list them, rotate them on a running cluster (install, use, remove)",
		Subcommands: []*cli.Command{
			{Name: "generate", Usage: "print a new random key (put it in every node's --gossip-key-file)", Action: func(c *cli.Context) error {
				k, err := gossip.GenerateKey()
				if err != nil {
					return err
				}
				fmt.Fprintln(c.App.Writer, k)
				return nil
			}},
			{Name: "list", Usage: "each node's key fingerprints, primary first", Flags: clusterFlags(),
				Action: func(c *cli.Context) error { return keyringCall(c, "list", "") }},
			change("install"), change("use"), change("remove"),
		},
	}
}

func keyringCall(c *cli.Context, op, key string) error {
	return withClient(c, func(ctx context.Context, cl coordv1.CoordinatorClient) error {
		ctx, cancel := context.WithTimeout(c.Context, 45*time.Second)
		defer cancel()
		resp, err := cl.Keyring(ctx, &coordv1.KeyringRequest{Op: op, Key: key})
		if err != nil {
			return err
		}
		var rows [][]string
		for _, n := range resp.Nodes {
			rows = append(rows, []string{n.NodeId, n.Kind, dash(strings.Join(n.Keys, " "))})
		}
		table(c.App.Writer, "NODE\tKIND\tKEYS (PRIMARY FIRST)", rows)
		if resp.Message != "" {
			fmt.Fprintln(c.App.Writer, resp.Message)
		}
		return nil
	})
}

func apikeyCommand() *cli.Command {
	return &cli.Command{
		Name:  "apikey",
		Usage: "make API keys for the OpenAI router (stored hashed, with models and a rate limit)",
		Subcommands: []*cli.Command{{
			Name:  "create",
			Usage: "print a new key once, and add its hashed entry to --file (or print the entry)",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "name", Required: true, Usage: "who the key is for"},
				&cli.StringSliceFlag{Name: "models", Required: true, Usage: "served model names it may use, or '*'"},
				&cli.Float64Flag{Name: "rps", Usage: "requests per second (0: unlimited)"},
				&cli.IntFlag{Name: "burst", Usage: "requests at once (default 2×rps)"},
				&cli.StringFlag{Name: "file", Usage: "API keys file to add the entry to (the router's --api-keys-file; then SIGHUP it)"},
			},
			Action: func(c *cli.Context) error {
				if c.Float64("rps") < 0 || c.Int("burst") < 0 {
					return fmt.Errorf("--rps and --burst must not be negative")
				}
				key, entry, err := router.NewKey(c.String("name"), splitList(c.StringSlice("models")), c.Float64("rps"), c.Int("burst"))
				if err != nil {
					return err
				}
				text := router.MarshalEntry(entry)
				if p := c.String("file"); p != "" {
					b, err := os.ReadFile(p)
					if err != nil && !os.IsNotExist(err) {
						return err
					}
					if len(b) == 0 {
						b = []byte("keys:\n")
					}
					out := string(b)
					if !strings.HasSuffix(out, "\n") {
						out += "\n"
					}
					for _, l := range strings.Split(strings.TrimRight(text, "\n"), "\n") {
						out += "  " + l + "\n"
					}
					// Checked before it replaces the file: a copy in a private temp dir.
					check, err := os.MkdirTemp("", "shoal-apikeys-")
					if err != nil {
						return err
					}
					defer os.RemoveAll(check)
					if err := os.WriteFile(filepath.Join(check, "keys.yaml"), []byte(out), 0o600); err != nil {
						return err
					}
					if _, err := router.LoadAPIKeys(filepath.Join(check, "keys.yaml")); err != nil {
						return fmt.Errorf("%s would not load after adding the key: %w", p, err)
					}
					// Group shoal reads it (the coordinator and router run as shoal).
					if err := secretfile.Write(p, []byte(out), 0o640); err != nil {
						return err
					}
					fmt.Fprintf(c.App.ErrWriter, "added %s to %s; send SIGHUP to the router/coordinator to load it\n", entry.Name, p)
				} else {
					fmt.Fprintf(c.App.ErrWriter, "add under `keys:` in the router's --api-keys-file:\n%s", text)
				}
				fmt.Fprintln(c.App.Writer, key)
				return nil
			},
		}},
	}
}
