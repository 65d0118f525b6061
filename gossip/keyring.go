package gossip

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/shoalhq/shoal/internal/secretfile"
)

// Gossip encryption: memberlist's AES-GCM keyring. A key file holds one
// base64 key per line, the first one used to send; every listed key is
// accepted on receipt, which is what lets keys rotate without a restart:
// install a new key everywhere, make it primary, remove the old one.

// GenerateKey returns a new 32-byte key, base64 encoded.
func GenerateKey() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return base64.StdEncoding.EncodeToString(b), nil
}

// ParseKey decodes and checks one key.
func ParseKey(s string) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, fmt.Errorf("gossip key is not base64: %w (make one with `shoal keyring generate`)", err)
	}
	if n := len(b); n != 16 && n != 24 && n != 32 {
		return nil, fmt.Errorf("gossip key is %d bytes; AES needs 16, 24 or 32 (make one with `shoal keyring generate`)", n)
	}
	return b, nil
}

// LoadKeyFile reads a key file (primary first).
func LoadKeyFile(path string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("gossip key file: %w", secretfile.Explain(path, err))
	}
	var keys [][]byte
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, err := ParseKey(line)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, i+1, err)
		}
		keys = append(keys, k)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("gossip key file %s holds no key", path)
	}
	return keys, nil
}

// WriteKeyFile saves keys (primary first). An existing file keeps its mode,
// owner and group (the agents, as root, and the coordinator, as shoal,
// rewrite the same file); a new one is 0660 with group shoal when root
// writes it (internal/secretfile).
func WriteKeyFile(path string, keys [][]byte) error {
	var sb strings.Builder
	for _, k := range keys {
		sb.WriteString(base64.StdEncoding.EncodeToString(k) + "\n")
	}
	return secretfile.Write(path, []byte(sb.String()), 0o660)
}

// Fingerprint names a key without revealing it.
func Fingerprint(k []byte) string {
	s := sha256.Sum256(k)
	return hex.EncodeToString(s[:4])
}

// Keyring operations.
const (
	KeyInstall = "install"
	KeyUse     = "use"
	KeyRemove  = "remove"
)

const msgKeyring = 'k'

type keyringMsg struct {
	ID  string `json:"id"`
	Op  string `json:"op"`
	Key []byte `json:"key"`
}

type broadcast []byte

func (b broadcast) Invalidates(memberlist.Broadcast) bool { return false }
func (b broadcast) Message() []byte                       { return b }
func (b broadcast) Finished()                             {}

// KeyringOp applies op to this node's keyring and gossips it to every
// member, which apply it too and save their key files. Without encryption
// configured it fails: keys cannot be added to a cleartext cluster live.
func (m *Membership) KeyringOp(op, key string) error {
	k, err := ParseKey(key)
	if err != nil {
		return err
	}
	id := make([]byte, 8)
	_, _ = rand.Read(id)
	msg := keyringMsg{ID: hex.EncodeToString(id), Op: op, Key: k}
	if m.bcast == nil {
		return errors.New("gossip is not started")
	}
	if err := m.applyKeyring(msg); err != nil {
		return err
	}
	b, _ := json.Marshal(msg)
	m.bcast.QueueBroadcast(broadcast(append([]byte{msgKeyring}, b...)))
	return nil
}

func (m *Membership) applyKeyring(msg keyringMsg) error {
	kr := m.keyring
	if kr == nil {
		return errors.New("gossip is not encrypted here; start every node with a gossip key file first")
	}
	m.mu.Lock()
	if m.seenOps == nil {
		m.seenOps = map[string]time.Time{}
	}
	if _, dup := m.seenOps[msg.ID]; dup {
		m.mu.Unlock()
		return errDuplicate
	}
	for id, at := range m.seenOps {
		if time.Since(at) > 10*time.Minute {
			delete(m.seenOps, id)
		}
	}
	m.seenOps[msg.ID] = time.Now()
	m.mu.Unlock()
	var err error
	switch msg.Op {
	case KeyInstall:
		err = kr.AddKey(msg.Key)
	case KeyUse:
		err = kr.UseKey(msg.Key)
	case KeyRemove:
		if primary := kr.GetPrimaryKey(); string(primary) == string(msg.Key) {
			return errors.New("cannot remove the primary key: `shoal keyring use` another key first")
		}
		err = kr.RemoveKey(msg.Key)
	default:
		return fmt.Errorf("unknown keyring operation %q", msg.Op)
	}
	if err != nil {
		return fmt.Errorf("keyring %s: %w", msg.Op, err)
	}
	if m.cfg.KeyFile != "" {
		if err := WriteKeyFile(m.cfg.KeyFile, m.keys()); err != nil {
			m.log.Error("cannot save gossip keys; a restart would lose this change", "file", m.cfg.KeyFile, "err", err)
		}
	}
	m.log.Info("gossip keyring changed", "op", msg.Op, "key", Fingerprint(msg.Key))
	fp := m.fingerprints()
	m.mu.Lock()
	m.local.Keys = fp
	if _, ok := m.members[m.local.ID]; ok {
		m.members[m.local.ID] = m.local
	}
	m.mu.Unlock()
	go func() { _ = m.ml.UpdateNode(2 * time.Second) }() // re-advertise fingerprints
	m.notify()
	return nil
}

var errDuplicate = errors.New("duplicate keyring message")

// keys returns the keyring, primary first.
func (m *Membership) keys() [][]byte {
	if m.keyring == nil {
		return nil
	}
	p := m.keyring.GetPrimaryKey()
	out := [][]byte{p}
	for _, k := range m.keyring.GetKeys() {
		if string(k) != string(p) {
			out = append(out, k)
		}
	}
	return out
}

// fingerprints is what the tag advertises: "primary,other,…".
func (m *Membership) fingerprints() string {
	var fs []string
	for _, k := range m.keys() {
		fs = append(fs, Fingerprint(k))
	}
	return strings.Join(fs, ",")
}

func (m *Membership) handleMsg(b []byte) {
	if len(b) < 2 || b[0] != msgKeyring {
		return
	}
	var msg keyringMsg
	if err := json.Unmarshal(b[1:], &msg); err != nil {
		m.log.Warn("malformed keyring message", "err", err)
		return
	}
	cp := append([]byte(nil), b...) // memberlist reuses its buffer
	go func() {
		err := m.applyKeyring(msg)
		if errors.Is(err, errDuplicate) {
			return
		}
		if err != nil {
			m.log.Warn("keyring message not applied", "op", msg.Op, "err", err)
		}
		if m.bcast != nil {
			m.bcast.QueueBroadcast(broadcast(cp)) // pass it on: others may still need it
		}
	}()
}
