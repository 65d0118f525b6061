// Package ocitest builds, for tests, an OCI image of the simulator: a static
// shoal-sim with ray, vllm, sglang and python3 links to it, written as an OCI
// layout tarball that `ctr images import` and containerd's client.Import read.
// No registry is needed (none is reachable from CI).
package ocitest

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// SimImageRef is the name the image is imported under.
const SimImageRef = "docker.io/shoal/sim:test"

// BuildSim compiles a static shoal-sim into dir and returns its path.
func BuildSim(dir string) (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "shoal-sim")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", out, "./cmd/shoal-sim")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build shoal-sim: %w: %s", err, b)
	}
	return out, nil
}

func moduleRoot() (string, error) {
	b, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(b))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("not inside the shoal module")
	}
	return filepath.Dir(gomod), nil
}

// SimImage builds the simulator image tarball in dir and returns its path.
func SimImage(dir string) (string, error) {
	sim, err := BuildSim(dir)
	if err != nil {
		return "", err
	}
	bin, err := os.ReadFile(sim)
	if err != nil {
		return "", err
	}
	layer, diffID, err := simLayer(bin)
	if err != nil {
		return "", err
	}
	return writeLayout(filepath.Join(dir, "shoal-sim-image.tar"), layer, diffID)
}

// simLayer is a gzipped tar: /usr/local/bin/shoal-sim, its links, /tmp.
func simLayer(bin []byte) (gz []byte, diffID string, err error) {
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	mt := time.Unix(0, 0)
	for _, d := range []string{"usr/", "usr/local/", "usr/local/bin/", "tmp/", "etc/"} {
		mode := int64(0o755)
		if d == "tmp/" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: mode, ModTime: mt}); err != nil {
			return nil, "", err
		}
	}
	files := map[string][]byte{"etc/passwd": []byte("root:x:0:0:root:/root:/bin/sh\n"), "etc/group": []byte("root:x:0:\n")}
	for _, name := range []string{"etc/group", "etc/passwd"} {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(files[name])), ModTime: mt}); err != nil {
			return nil, "", err
		}
		if _, err := tw.Write(files[name]); err != nil {
			return nil, "", err
		}
	}
	if err := tw.WriteHeader(&tar.Header{Name: "usr/local/bin/shoal-sim", Mode: 0o755, Size: int64(len(bin)), ModTime: mt}); err != nil {
		return nil, "", err
	}
	if _, err := tw.Write(bin); err != nil {
		return nil, "", err
	}
	for _, l := range []string{"ray", "vllm", "sglang", "python3"} {
		if err := tw.WriteHeader(&tar.Header{Name: "usr/local/bin/" + l, Typeflag: tar.TypeSymlink, Linkname: "shoal-sim", Mode: 0o777, ModTime: mt}); err != nil {
			return nil, "", err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, "", err
	}
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	if _, err := zw.Write(raw.Bytes()); err != nil {
		return nil, "", err
	}
	if err := zw.Close(); err != nil {
		return nil, "", err
	}
	return z.Bytes(), digest(raw.Bytes()), nil
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int               `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    map[string]string `json:"platform,omitempty"`
}

// writeLayout writes an OCI image layout tarball holding one image.
func writeLayout(path string, layer []byte, diffID string) (string, error) {
	config, _ := json.Marshal(map[string]any{
		"architecture": "amd64", "os": "linux",
		"config": map[string]any{"Env": []string{"PATH=/usr/local/bin:/usr/bin:/bin"}, "WorkingDir": "/"},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{diffID}},
	})
	manifest, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
		"config": descriptor{MediaType: "application/vnd.oci.image.config.v1+json", Digest: digest(config), Size: len(config)},
		"layers": []descriptor{{MediaType: "application/vnd.oci.image.layer.v1.tar+gzip", Digest: digest(layer), Size: len(layer)}},
	})
	index, _ := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
		"manifests": []descriptor{{MediaType: "application/vnd.oci.image.manifest.v1+json", Digest: digest(manifest), Size: len(manifest),
			Annotations: map[string]string{"io.containerd.image.name": SimImageRef, "org.opencontainers.image.ref.name": "test"},
			Platform:    map[string]string{"architecture": "amd64", "os": "linux"}}},
	})
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	add := func(name string, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), ModTime: time.Unix(0, 0)}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	blob := func(b []byte) string { return "blobs/sha256/" + strings.TrimPrefix(digest(b), "sha256:") }
	for _, e := range []struct {
		name string
		b    []byte
	}{{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)}, {"index.json", index},
		{blob(config), config}, {blob(manifest), manifest}, {blob(layer), layer}} {
		if err := add(e.name, e.b); err != nil {
			return "", err
		}
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	return path, f.Sync()
}
