// Command sbx-cluster is a multi-call binary that runs every component of the
// local Kubernetes control plane used for development and tests of
// sandbox-controller: embedded etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler, kwok and a matching kubectl.
//
// The components share process-global state (feature gates, logging flags,
// metrics registries), so each one must run in its own process:
//
//	sbx-cluster etcd --data-dir DIR --client-port N --peer-port M
//	sbx-cluster kube-apiserver <kube-apiserver flags>
//	sbx-cluster kube-controller-manager <flags>
//	sbx-cluster kube-scheduler <flags>
//	sbx-cluster kwok <flags>
//	sbx-cluster kubectl <args>          (also when invoked through a symlink named kubectl)
//	sbx-cluster certs --dir DIR ...     (CA, serving and client certificates, SA key, kubeconfigs)
//	sbx-cluster advertise-address       (prints a non-loopback local IPv4 address)
//	sbx-cluster watch-parent --pid PID -- CMD...  (runs CMD once PID has exited)
//
// cluster.sh wires these together; nothing here listens on anything but 127.0.0.1.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

type command struct {
	run     func() int
	summary string
}

var commands = map[string]command{
	"etcd":                    {runEtcd, "embedded etcd (single member, 127.0.0.1 only)"},
	"kube-apiserver":          {runAPIServer, "kube-apiserver " + kubeVersion},
	"kube-controller-manager": {runControllerManager, "kube-controller-manager " + kubeVersion},
	"kube-scheduler":          {runScheduler, "kube-scheduler " + kubeVersion},
	"kwok":                    {runKwok, "kwok (fake nodes and pod status)"},
	"kubectl":                 {runKubectl, "kubectl " + kubeVersion},
	"certs":                   {runCerts, "generate PKI, service-account key and kubeconfigs"},
	"advertise-address":       {runAdvertiseAddress, "print a non-loopback IPv4 address of this machine"},
	"watch-parent":            {runWatchParent, "run a command once a given process has exited"},
}

// kubeVersion is informational; the real pin is go.mod/go.sum.
const kubeVersion = "v1.36.3"

func usage() {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: %s <component> [flags]\n\ncomponents:\n", filepath.Base(os.Args[0]))
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-25s %s\n", n, commands[n].summary)
	}
}

func main() {
	// Multi-call: dispatch on the program name first (symlink "kubectl"),
	// then on the first argument.
	name := strings.TrimSuffix(filepath.Base(os.Args[0]), ".exe")
	if _, ok := commands[name]; !ok {
		if len(os.Args) < 2 || strings.HasPrefix(os.Args[1], "-") {
			usage()
			os.Exit(2)
		}
		name = os.Args[1]
		// Components parse os.Args themselves (kwok's config loader reads
		// os.Args[1:] directly), so make it look like they were run on their own.
		os.Args = append([]string{name}, os.Args[2:]...)
	}
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown component %q\n\n", name)
		usage()
		os.Exit(2)
	}
	os.Exit(cmd.run())
}
