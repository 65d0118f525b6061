package chaos

import (
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
)

// subnet is the chaos network: hosts get .2–.253, the test's own (root)
// namespace .254. It is a private range no test machine here routes.
const subnet = "10.213.77."

// Net is a set of network namespaces, each a "host" with one interface on a
// shared bridge (itself in a namespace), plus a leg into the test's own
// namespace so the test reaches every host.
type Net struct {
	id     string            // prefix of every namespace and interface name
	subnet string            // "10.213.77."
	hosts  map[string]string // host name → namespace
	ips    map[string]string // host name → IP
	order  []string
}

func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// NewNet creates one namespace per host, named in hosts with the last octet
// of its IP. On error it removes what it made.
func NewNet(hosts map[string]int) (n *Net, err error) { return NewNetOn(subnet, hosts) }

// NewNetOn is NewNet on another /24 (prefix "10.213.78."), for a suite
// that must not meet the chaos suite's hosts.
func NewNetOn(subnet string, hosts map[string]int) (n *Net, err error) {
	cleanStale()
	n = &Net{id: "sc" + strconv.Itoa(os.Getpid()%100000), subnet: subnet, hosts: map[string]string{}, ips: map[string]string{}}
	defer func() {
		if err != nil {
			n.Close()
		}
	}()
	br := n.id + "-br"
	if err := ipCmd("netns", "add", br); err != nil {
		return nil, err
	}
	n.order = append(n.order, br)
	for _, c := range [][]string{{"link", "add", "br0", "type", "bridge"}, {"link", "set", "br0", "up"}} {
		if err := ipCmd(append([]string{"-n", br}, c...)...); err != nil {
			return nil, err
		}
	}
	// A leg from the test's namespace.
	rootA, rootB := n.id+"-254a", n.id+"-254b"
	for _, c := range [][]string{
		{"link", "add", rootA, "type", "veth", "peer", "name", rootB},
		{"link", "set", rootA, "netns", br},
		{"-n", br, "link", "set", rootA, "master", "br0", "up"},
		{"addr", "add", n.subnet + "254/24", "dev", rootB},
		{"link", "set", rootB, "up"},
	} {
		if err := ipCmd(c...); err != nil {
			return nil, err
		}
	}
	for name, octet := range hosts {
		ns := fmt.Sprintf("%s-%d", n.id, octet)
		a, b := fmt.Sprintf("%s-%da", n.id, octet), fmt.Sprintf("%s-%db", n.id, octet)
		ip := n.subnet + strconv.Itoa(octet)
		if err := ipCmd("netns", "add", ns); err != nil {
			return nil, err
		}
		n.order = append(n.order, ns)
		for _, c := range [][]string{
			{"link", "add", a, "type", "veth", "peer", "name", b},
			{"link", "set", a, "netns", br},
			{"-n", br, "link", "set", a, "master", "br0", "up"},
			{"link", "set", b, "netns", ns},
			{"-n", ns, "link", "set", b, "name", "eth0"},
			{"-n", ns, "addr", "add", ip + "/24", "dev", "eth0"},
			{"-n", ns, "link", "set", "eth0", "up"},
			{"-n", ns, "link", "set", "lo", "up"},
		} {
			if err := ipCmd(c...); err != nil {
				return nil, err
			}
		}
		n.hosts[name], n.ips[name] = ns, ip
	}
	return n, nil
}

// Root is the test's own address on the network.
func (n *Net) Root() string { return n.subnet + "254" }

// IP is a host's address.
func (n *Net) IP(host string) string { return n.ips[host] }

// Wrap is the command prefix that runs a program inside host's namespace.
func (n *Net) Wrap(host string) []string { return []string{"ip", "netns", "exec", n.hosts[host]} }

// iptables runs iptables inside host's namespace.
func (n *Net) iptables(host string, args ...string) error {
	out, err := exec.Command("ip", append([]string{"netns", "exec", n.hosts[host], "iptables", "-w"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables %s in %s: %w: %s", strings.Join(args, " "), host, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Drop makes host discard every packet from (in) and to (out) the peers.
// in only: an asymmetric partition (host cannot hear the peers).
func (n *Net) Drop(host string, in, out bool, peers ...string) error {
	for _, p := range peers {
		if in {
			if err := n.iptables(host, "-A", "INPUT", "-s", n.ips[p], "-j", "DROP"); err != nil {
				return err
			}
		}
		if out {
			if err := n.iptables(host, "-A", "OUTPUT", "-d", n.ips[p], "-j", "DROP"); err != nil {
				return err
			}
		}
	}
	return nil
}

// Isolate cuts host off from every other host (the test's own leg stays).
func (n *Net) Isolate(host string) error {
	for _, chain := range []string{"INPUT", "OUTPUT"} {
		flag := "-s"
		if chain == "OUTPUT" {
			flag = "-d"
		}
		if err := n.iptables(host, "-A", chain, "!", flag, n.subnet+"254", "-j", "DROP"); err != nil {
			return err
		}
	}
	return nil
}

// Heal removes every rule from every host.
func (n *Net) Heal() error {
	for h := range n.hosts {
		if err := n.iptables(h, "-F"); err != nil {
			return err
		}
	}
	return nil
}

// Close kills every process left in the namespaces and deletes them (and
// with them the interfaces). Safe to call more than once.
func (n *Net) Close() {
	for _, ns := range n.order {
		killNetnsPids(ns)
		_ = ipCmd("netns", "del", ns)
	}
	n.order = nil
	_ = ipCmd("link", "del", n.id+"-254b")
}

func killNetnsPids(ns string) {
	out, _ := exec.Command("ip", "netns", "pids", ns).Output()
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

var staleRE = regexp.MustCompile(`^sc(\d+)-(\d+|br)\b`)

// cleanStale removes namespaces an earlier run left (its process is gone).
func cleanStale() {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		m := staleRE.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		pid, _ := strconv.Atoi(m[1])
		if pid == os.Getpid()%100000 || syscall.Kill(pid, 0) == nil {
			continue
		}
		ns := strings.Fields(line)[0]
		killNetnsPids(ns)
		_ = ipCmd("netns", "del", ns)
		_ = ipCmd("link", "del", "sc"+m[1]+"-254b")
	}
}
