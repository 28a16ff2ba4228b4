package main

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// Identities of the components. The controller manager and the scheduler use
// the names the bootstrap RBAC policy grants permissions to; kwok acts as the
// kubelet of every fake node and is a cluster admin.
var clientIdentities = []struct {
	file   string
	cn     string
	groups []string
}{
	{"admin", "sbx-admin", []string{"system:masters"}},
	{"kube-controller-manager", "system:kube-controller-manager", nil},
	{"kube-scheduler", "system:kube-scheduler", nil},
	{"kwok", "sbx-kwok", []string{"system:masters"}},
}

const (
	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 365 * 24 * time.Hour
	// Leaf certificates closer than this to expiry are re-issued by `certs`.
	renewBefore = 30 * 24 * time.Hour
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// runCerts makes sure DIR holds a CA, an apiserver serving certificate, one
// client certificate per component, a service-account signing key and one
// kubeconfig per component. Existing material is reused while it is still
// valid, so repeated runs are cheap and keep issued kubeconfigs working.
func runCerts() int {
	fs := flag.NewFlagSet("certs", flag.ExitOnError)
	dir := fs.String("dir", "", "output directory (required)")
	server := fs.String("server", "", "apiserver URL written into the kubeconfigs, e.g. https://127.0.0.1:16440 (required)")
	cluster := fs.String("cluster-name", "sbx-local", "cluster/context name in the kubeconfigs")
	var ips, dnsNames stringList
	fs.Var(&ips, "ip", "extra IP SAN for the apiserver certificate (repeatable)")
	fs.Var(&dnsNames, "dns", "extra DNS SAN for the apiserver certificate (repeatable)")
	_ = fs.Parse(os.Args[1:])
	if *dir == "" || *server == "" {
		fmt.Fprintln(os.Stderr, "certs: --dir and --server are required")
		return 2
	}
	if err := ensurePKI(*dir, *server, *cluster, ips, dnsNames); err != nil {
		fmt.Fprintf(os.Stderr, "certs: %v\n", err)
		return 1
	}
	return 0
}

func ensurePKI(dir, server, clusterName string, extraIPs, extraDNS []string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	caCert, caKey, err := ensureCA(dir)
	if err != nil {
		return fmt.Errorf("CA: %w", err)
	}

	ips := []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")}
	for _, s := range extraIPs {
		ip := net.ParseIP(s)
		if ip == nil {
			return fmt.Errorf("invalid --ip %q", s)
		}
		ips = append(ips, ip)
	}
	dns := append([]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
		"kubernetes.default.svc.cluster.local"}, extraDNS...)
	serving := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    dns,
		IPAddresses: ips,
	}
	if err := ensureLeaf(dir, "apiserver", serving, caCert, caKey); err != nil {
		return fmt.Errorf("apiserver certificate: %w", err)
	}

	for _, id := range clientIdentities {
		tmpl := &x509.Certificate{
			Subject:     pkix.Name{CommonName: id.cn, Organization: id.groups},
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		}
		if err := ensureLeaf(dir, id.file, tmpl, caCert, caKey); err != nil {
			return fmt.Errorf("%s client certificate: %w", id.file, err)
		}
		if err := writeKubeconfig(dir, id.file, server, clusterName); err != nil {
			return fmt.Errorf("%s kubeconfig: %w", id.file, err)
		}
	}

	if err := ensureServiceAccountKey(dir); err != nil {
		return fmt.Errorf("service-account key: %w", err)
	}
	return nil
}

func ensureCA(dir string) (*x509.Certificate, crypto.Signer, error) {
	certPath, keyPath := filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")
	if cert, key, err := loadPair(certPath, keyPath); err == nil {
		if time.Until(cert.NotAfter) > renewBefore && cert.IsCA {
			return cert, key, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(),
		Subject:               pkix.Name{CommonName: "sbx-local-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, err
	}
	// A new CA invalidates every leaf signed by the old one.
	for _, f := range []string{"apiserver"} {
		_ = os.Remove(filepath.Join(dir, f+".crt"))
	}
	for _, id := range clientIdentities {
		_ = os.Remove(filepath.Join(dir, id.file+".crt"))
	}
	if err := writePair(certPath, keyPath, der, key); err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

// ensureLeaf keeps an existing certificate when it is signed by the current
// CA, is not about to expire and carries the same subject and SANs; otherwise
// it issues a new one.
func ensureLeaf(dir, name string, tmpl *x509.Certificate, ca *x509.Certificate, caKey crypto.Signer) error {
	certPath, keyPath := filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	if cert, _, err := loadPair(certPath, keyPath); err == nil {
		if cert.CheckSignatureFrom(ca) == nil && time.Until(cert.NotAfter) > renewBefore &&
			cert.Subject.CommonName == tmpl.Subject.CommonName &&
			slices.Equal(cert.Subject.Organization, tmpl.Subject.Organization) &&
			slices.Equal(cert.DNSNames, tmpl.DNSNames) && sameIPs(cert.IPAddresses, tmpl.IPAddresses) {
			return nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl.SerialNumber = newSerial()
	tmpl.NotBefore = now.Add(-time.Hour)
	tmpl.NotAfter = now.Add(leafValidity)
	tmpl.BasicConstraintsValid = true
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return err
	}
	return writePair(certPath, keyPath, der, key)
}

func ensureServiceAccountKey(dir string) error {
	keyPath, pubPath := filepath.Join(dir, "sa.key"), filepath.Join(dir, "sa.pub")
	if _, err := os.Stat(keyPath); err == nil {
		if _, err := os.Stat(pubPath); err == nil {
			return nil
		}
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	return writeFileAtomic(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o644)
}

func writeKubeconfig(dir, name, server, clusterName string) error {
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return err
	}
	certPEM, err := os.ReadFile(filepath.Join(dir, name+".crt"))
	if err != nil {
		return err
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, name+".key"))
	if err != nil {
		return err
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[clusterName] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: caPEM}
	cfg.AuthInfos[name] = &clientcmdapi.AuthInfo{ClientCertificateData: certPEM, ClientKeyData: keyPEM}
	cfg.Contexts[clusterName] = &clientcmdapi.Context{Cluster: clusterName, AuthInfo: name, Namespace: "default"}
	cfg.CurrentContext = clusterName
	data, err := clientcmd.Write(*cfg)
	if err != nil {
		return err
	}
	path := filepath.Join(dir, name+".kubeconfig")
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return nil
	}
	return writeFileAtomic(path, data, 0o600)
}

func loadPair(certPath, keyPath string) (*x509.Certificate, crypto.Signer, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, nil, err
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, nil, err
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, nil, fmt.Errorf("%s or %s is not PEM", certPath, keyPath)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

func writePair(certPath, keyPath string, der []byte, key *ecdsa.PrivateKey) error {
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	return writeFileAtomic(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func newSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		panic(err)
	}
	return n
}

func sameIPs(a, b []net.IP) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}
