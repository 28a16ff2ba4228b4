package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// runAdvertiseAddress prints the address kube-apiserver should advertise.
// kube-apiserver rejects loopback addresses and only auto-detects one when a
// default route exists, so we pick: the address of the default-route
// interface, else the first non-loopback IPv4 address of an interface that is
// up. Nothing ever connects to it (the endpoint reconciler is disabled).
func runAdvertiseAddress() int {
	ip, err := advertiseAddress()
	if err != nil {
		fmt.Fprintf(os.Stderr, "advertise-address: %v\n", err)
		return 1
	}
	fmt.Println(ip)
	return 0
}

func advertiseAddress() (string, error) {
	if iface := defaultRouteInterface(); iface != "" {
		if ifi, err := net.InterfaceByName(iface); err == nil {
			if ip := firstIPv4(ifi); ip != "" {
				return ip, nil
			}
		}
	}
	ifaces, err := net.Interfaces()
	if err != nil {
		return "", err
	}
	for i := range ifaces {
		ifi := &ifaces[i]
		if ifi.Flags&net.FlagUp == 0 || ifi.Flags&net.FlagLoopback != 0 {
			continue
		}
		if ip := firstIPv4(ifi); ip != "" {
			return ip, nil
		}
	}
	return "", errors.New("no non-loopback IPv4 address found; set SBX_ADVERTISE_ADDRESS to an address of this machine")
}

func defaultRouteInterface() string {
	f, err := os.Open("/proc/net/route")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		// Iface Destination Gateway Flags ... Mask
		if len(fields) >= 8 && fields[1] == "00000000" && fields[7] == "00000000" {
			return fields[0]
		}
	}
	return ""
}

func firstIPv4(ifi *net.Interface) string {
	addrs, err := ifi.Addrs()
	if err != nil {
		return ""
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip4 := n.IP.To4(); ip4 != nil && !ip4.IsLoopback() && !ip4.IsLinkLocalUnicast() {
				return ip4.String()
			}
		}
	}
	return ""
}

// runWatchParent waits until process --pid has exited, then runs the command
// after "--" and exits with its status. cluster.sh uses it so that a cluster
// started on behalf of a test binary is torn down when that binary exits,
// however it exits. PID reuse is detected through the process start time.
func runWatchParent() int {
	fs := flag.NewFlagSet("watch-parent", flag.ExitOnError)
	pid := fs.Int("pid", 0, "process to watch (required)")
	interval := fs.Duration("interval", 500*time.Millisecond, "poll interval")
	_ = fs.Parse(os.Args[1:])
	args := fs.Args()
	if *pid <= 0 || len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: watch-parent --pid PID -- command [args...]")
		return 2
	}
	start := procStartTime(*pid)
	if start == "" {
		fmt.Fprintf(os.Stderr, "watch-parent: process %d does not exist; running %q now\n", *pid, args)
	} else {
		// SIGTERM/SIGINT to the watcher itself also means "stop now".
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
		ticker := time.NewTicker(*interval)
		defer ticker.Stop()
	loop:
		for {
			select {
			case s := <-sig:
				fmt.Fprintf(os.Stderr, "watch-parent: %v received\n", s)
				break loop
			case <-ticker.C:
				if procStartTime(*pid) != start {
					fmt.Fprintf(os.Stderr, "watch-parent: process %d exited\n", *pid)
					break loop
				}
			}
		}
		signal.Reset()
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		fmt.Fprintf(os.Stderr, "watch-parent: %v\n", err)
		return 1
	}
	return 0
}

// procStartTime returns field 22 of /proc/PID/stat (start time in clock
// ticks since boot), or "" when the process does not exist or is a zombie.
func procStartTime(pid int) string {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	s := string(data)
	// The command name (field 2) may contain spaces; it ends at the last ')'.
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return ""
	}
	fields := strings.Fields(s[i+1:])
	// fields[0] is field 3 (state), so field 22 is fields[19].
	if len(fields) < 20 || fields[0] == "Z" || fields[0] == "X" {
		return ""
	}
	return fields[19]
}
