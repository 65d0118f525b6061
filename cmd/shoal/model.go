package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/shoalhq/shoal/internal/bytesize"
	"github.com/shoalhq/shoal/model"
	"github.com/urfave/cli/v2"
)

func modelCommand() *cli.Command {
	return &cli.Command{
		Name:  "model",
		Usage: "fetch or check model weights on this host",
		Subcommands: []*cli.Command{
			{
				Name:      "pull",
				Usage:     "download a model (hf://, s3://, gs://) to a directory, resuming any earlier partial pull",
				ArgsUsage: "URI",
				Flags: append(modelSourceFlags(),
					&cli.StringFlag{Name: "dir", Usage: "target directory (default ./NAME, NAME from the URI)"},
					&cli.StringSliceFlag{Name: "suffix", Usage: "keep files with these extensions (json,safetensors,py); default all"},
					&cli.StringSliceFlag{Name: "include", Usage: "keep files matching this glob (repeatable)"},
					&cli.StringSliceFlag{Name: "exclude", Usage: "drop files matching this glob (repeatable)"},
					&cli.BoolFlag{Name: "force", Usage: "list the source again even if the directory holds a completed pull"},
					&cli.BoolFlag{Name: "no-verify", Usage: "skip the content hash check (sizes are still checked)"},
					&cli.BoolFlag{Name: "no-progress", Usage: "log lines instead of a progress bar"},
				),
				Action: modelPull,
			},
			{
				Name:      "check",
				Usage:     "check that a local or shared model directory is complete",
				ArgsUsage: "DIR",
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return fmt.Errorf("usage: shoal model check DIR")
					}
					if err := model.Check(c.Args().First()); err != nil {
						return err
					}
					fmt.Fprintf(c.App.Writer, "%s: complete\n", c.Args().First())
					return nil
				},
			},
		},
	}
}

// modelSourceFlags are the download settings the agent shares.
func modelSourceFlags() []cli.Flag {
	return []cli.Flag{
		&cli.IntFlag{Name: "workers", Value: model.DefaultWorkers, EnvVars: []string{"SHOAL_DOWNLOAD_WORKERS"}, Usage: "concurrent ranged GETs across all files (default: 4 per CPU, 8 to 64)"},
		&cli.StringFlag{Name: "part-size", Value: "64Mi", EnvVars: []string{"SHOAL_DOWNLOAD_PART_SIZE"}, Usage: "size of one ranged GET, 1Mi to 4Gi (" + bytesize.Units + ")"},
		&cli.StringFlag{Name: "limit-rate", EnvVars: []string{"SHOAL_DOWNLOAD_LIMIT_RATE"}, Usage: "cap the pull's total rate per second, e.g. 500Mi (" + bytesize.Units + "); default none"},
		&cli.StringFlag{Name: "s3-endpoint", EnvVars: []string{"SHOAL_S3_ENDPOINT"}, Usage: "S3-compatible endpoint URL (default AWS_ENDPOINT_URL, then AWS)"},
		&cli.BoolFlag{Name: "s3-path-style", EnvVars: []string{"SHOAL_S3_PATH_STYLE"}, Usage: "S3 path-style addressing, --s3-path-style=false for virtual-hosted (default: path style when an endpoint is set)"},
		&cli.StringFlag{Name: "hf-endpoint", EnvVars: []string{"SHOAL_HF_ENDPOINT"}, Usage: "Hugging Face endpoint (default HF_ENDPOINT, then https://huggingface.co)"},
	}
}

func sourceConfig(c *cli.Context) (model.Config, int64, error) {
	cfg := model.Config{S3Endpoint: c.String("s3-endpoint"), HFEndpoint: c.String("hf-endpoint"), Workers: c.Int("workers"), S3PathStyle: pathStyle(c)}
	part, err := parseSize(c.String("part-size"))
	if err != nil {
		return cfg, 0, fmt.Errorf("--part-size: %w", err)
	}
	if cfg.Workers < 1 || cfg.Workers > 1024 {
		return cfg, 0, fmt.Errorf("--workers: want 1..1024, got %d", cfg.Workers)
	}
	return cfg, part, nil
}

// pathStyle is --s3-path-style, or nil when not given (the source decides).
func pathStyle(c *cli.Context) *bool {
	if !c.IsSet("s3-path-style") {
		return nil
	}
	b := c.Bool("s3-path-style")
	return &b
}

// limitRate reads --limit-rate ("" is no limit).
func limitRate(c *cli.Context) (int64, error) {
	v := c.String("limit-rate")
	if v == "" {
		return 0, nil
	}
	n, err := bytesize.ParseIn(v, 64<<10, 1<<40)
	if err != nil {
		return 0, fmt.Errorf("--limit-rate: %w", err)
	}
	return n, nil
}

// parseSize reads a part size: 64Mi, 8M, 1Gi, 1048576 (1 MiB to 4 GiB).
func parseSize(s string) (int64, error) { return bytesize.ParseIn(s, 1<<20, 4<<30) }

func modelPull(c *cli.Context) error {
	if c.NArg() != 1 {
		return fmt.Errorf("usage: shoal model pull URI [--dir DIR]")
	}
	u, err := model.ParseURI(c.Args().First())
	if err != nil {
		return err
	}
	dir := c.String("dir")
	if u.Scheme == model.SchemeLocal {
		if err := model.Check(u.Path); err != nil {
			return err
		}
		fmt.Fprintln(c.App.Writer, u.Path)
		return nil
	}
	if dir == "" {
		dir = u.Name()
	}
	if dir, err = filepath.Abs(dir); err != nil {
		return err
	}
	cfg, part, err := sourceConfig(c)
	if err != nil {
		return err
	}
	src, err := model.Open(c.Context, u, cfg)
	if err != nil {
		return err
	}
	limit, err := limitRate(c)
	if err != nil {
		return err
	}
	bar := !c.Bool("no-progress") && isTerminal(os.Stderr)
	log := logger(c)
	var pb *progressBar
	if bar {
		pb = &progressBar{w: os.Stderr}
		log = slog.New(slog.NewTextHandler(pb, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	opt := model.Options{Dir: dir, Workers: cfg.Workers, ChunkSize: part, SkipVerify: c.Bool("no-verify"), Force: c.Bool("force"),
		Filter: model.Filter{Suffixes: splitList(c.StringSlice("suffix")), Include: c.StringSlice("include"), Exclude: c.StringSlice("exclude")},
		Log:    log, LogEvery: 5 * time.Second, RateLimit: limit}
	if pb != nil {
		opt.OnProgress = pb.update
	}
	m, err := model.Pull(c.Context, src, opt)
	if pb != nil {
		pb.finish()
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "%s: %d files, %s\n", u, len(m.Files), model.Human(m.Bytes))
	fmt.Fprintln(c.App.Writer, dir)
	return nil
}

func splitList(in []string) []string {
	var out []string
	for _, s := range in {
		for _, p := range strings.Split(s, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

func isTerminal(f *os.File) bool {
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// progressBar redraws one status line; log lines written through it are
// printed above the bar.
type progressBar struct {
	mu   sync.Mutex
	w    io.Writer
	line string
}

func (b *progressBar) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	fmt.Fprintf(b.w, "\r\033[K%s", p)
	fmt.Fprint(b.w, b.line)
	return len(p), nil
}

func (b *progressBar) update(p model.Progress) {
	const width = 30
	fill := int(p.Fraction() * width)
	eta := "-"
	if p.ETA > 0 {
		eta = p.ETA.Round(time.Second).String()
	}
	line := fmt.Sprintf("%-11s [%s%s] %5.1f%%  %s / %s  %s/s  files %d/%d  ETA %s",
		p.Phase, strings.Repeat("=", fill), strings.Repeat(" ", width-fill), 100*p.Fraction(),
		model.Human(p.BytesDone), model.Human(p.Bytes), model.Human(int64(p.Rate)), p.FilesDone, p.Files, eta)
	if p.Message != "" {
		line += "  (" + p.Message + ")"
	}
	b.mu.Lock()
	b.line = line
	fmt.Fprintf(b.w, "\r\033[K%s", line)
	b.mu.Unlock()
}

func (b *progressBar) finish() {
	b.mu.Lock()
	defer b.mu.Unlock()
	fmt.Fprintln(b.w)
}
