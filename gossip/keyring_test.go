package gossip

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func startKeyed(t *testing.T, id, ip string, join []string, keyFile string) (*Membership, context.CancelFunc) {
	t.Helper()
	var keys [][]byte
	if keyFile != "" {
		var err error
		keys, err = LoadKeyFile(keyFile)
		require.NoError(t, err)
	}
	port := freePort(t, ip)
	m := New(Config{Cluster: "k", BindAddr: ip, BindPort: port, Join: join, Profile: "fast", Keys: keys, KeyFile: keyFile},
		Tag{Kind: KindAgent, ID: id, GRPC: fmt.Sprintf("%s:%d", ip, port+1), Healthy: true})
	require.NoError(t, m.Start())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = m.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return m, cancel
}

func keyFile(t *testing.T, keys ...string) string {
	p := filepath.Join(t.TempDir(), "gossip.key")
	var raw [][]byte
	for _, k := range keys {
		b, err := ParseKey(k)
		require.NoError(t, err)
		raw = append(raw, b)
	}
	require.NoError(t, WriteKeyFile(p, raw))
	return p
}

func TestEncryptedGossipRefusesWrongOrMissingKeys(t *testing.T) {
	ka, _ := GenerateKey()
	kb, _ := GenerateKey()
	a, _ := startKeyed(t, "a", "127.0.0.31", nil, keyFile(t, ka))
	_, _ = startKeyed(t, "b", "127.0.0.32", []string{a.Addr()}, keyFile(t, ka))
	require.Eventually(t, func() bool { return len(a.Members()) == 2 }, 5*time.Second, 20*time.Millisecond)

	// A wrong key and no key: never members, whatever they try.
	_, _ = startKeyed(t, "wrong", "127.0.0.33", []string{a.Addr()}, keyFile(t, kb))
	_, _ = startKeyed(t, "clear", "127.0.0.34", []string{a.Addr()}, "")
	time.Sleep(2 * time.Second)
	require.Len(t, a.Members(), 2, "%v", a.Members())

	_, err := ParseKey("c2hvcnQ=")
	require.ErrorContains(t, err, "16, 24 or 32")
	_, err = ParseKey("not base64!")
	require.ErrorContains(t, err, "base64")
}

func TestKeyringRotationWithoutRestart(t *testing.T) {
	ka, _ := GenerateKey()
	kb, _ := GenerateKey()
	files := []string{keyFile(t, ka), keyFile(t, ka), keyFile(t, ka)}
	a, _ := startKeyed(t, "a", "127.0.0.41", nil, files[0])
	b, _ := startKeyed(t, "b", "127.0.0.42", []string{a.Addr()}, files[1])
	c, _ := startKeyed(t, "c", "127.0.0.43", []string{a.Addr()}, files[2])
	require.Eventually(t, func() bool { return len(a.Members()) == 3 }, 5*time.Second, 20*time.Millisecond)
	bKey, _ := ParseKey(kb)
	fb := Fingerprint(bKey)
	everyone := func(f func(Tag) bool) bool {
		for _, m := range []*Membership{a, b, c} {
			for _, tg := range m.Members() {
				if !f(tg) {
					return false
				}
			}
		}
		return true
	}
	require.NoError(t, a.KeyringOp(KeyInstall, kb))
	require.Eventually(t, func() bool { return everyone(func(t Tag) bool { return strings.Contains(t.Keys, fb) }) }, 10*time.Second, 50*time.Millisecond)
	require.NoError(t, b.KeyringOp(KeyUse, kb), "any member can drive the rotation")
	require.Eventually(t, func() bool { return everyone(func(t Tag) bool { return strings.HasPrefix(t.Keys, fb) }) }, 10*time.Second, 50*time.Millisecond)
	require.ErrorContains(t, a.KeyringOp(KeyRemove, kb), "primary")
	require.NoError(t, a.KeyringOp(KeyRemove, ka))
	require.Eventually(t, func() bool { return everyone(func(t Tag) bool { return t.Keys == fb }) }, 10*time.Second, 50*time.Millisecond)
	for _, f := range files {
		keys, err := LoadKeyFile(f)
		require.NoError(t, err)
		require.Len(t, keys, 1, "the key file was rewritten")
		require.Equal(t, fb, Fingerprint(keys[0]))
	}
	// A node with only the new key joins; one with only the old key cannot.
	d, _ := startKeyed(t, "d", "127.0.0.44", []string{a.Addr()}, keyFile(t, kb))
	require.Eventually(t, func() bool { return len(d.Members()) == 4 }, 5*time.Second, 20*time.Millisecond)
	_, _ = startKeyed(t, "old", "127.0.0.45", []string{a.Addr()}, keyFile(t, ka))
	time.Sleep(1500 * time.Millisecond)
	require.Len(t, a.Members(), 4)
}

// Keyring messages arrive from the network and key files from disk: both
// reject garbage with an error, never a panic, and never apply a bad key.
func FuzzKeyringInputs(f *testing.F) {
	k, _ := GenerateKey()
	f.Add([]byte("k{\"id\":\"1\",\"op\":\"install\",\"key\":\"" + k + "\"}"))
	f.Add([]byte("k{\"op\":\"remove\"}"))
	f.Add([]byte(k + "\n# comment\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m := New(Config{Cluster: "f"}, Tag{Kind: KindAgent, ID: "a", GRPC: "127.0.0.1:1"})
		m.handleMsg(b) // no keyring: must refuse, not crash
		p := filepath.Join(t.TempDir(), "k")
		if err := os.WriteFile(p, b, 0o600); err == nil {
			if keys, err := LoadKeyFile(p); err == nil {
				for _, k := range keys {
					if n := len(k); n != 16 && n != 24 && n != 32 {
						t.Fatalf("accepted a %d-byte key", n)
					}
				}
			}
		}
	})
}
