// Command mldsapeer is a Go 1.27 crypto/tls peer for ML-DSA interop with the Trellis
// engine: mutual TLS 1.3 with ML-DSA X509-SVIDs, and an x509-only chain check.
//
//	mldsapeer server -dir SVID_DIR [-listen 127.0.0.1:0]
//	mldsapeer client -dir SVID_DIR -connect HOST:PORT
//	mldsapeer verify -dir SVID_DIR
//
// SVID_DIR holds svid.pem (leaf, then intermediate), svid.key (PKCS#8) and bundle.pem.
// Both TLS sides require and verify the peer's chain against bundle.pem with
// x509.Certificate.Verify, print a "handshake" JSON line, and exchange one line.
//
// Go reports no peer signature scheme in ConnectionState. What it does guarantee is that
// a CertificateVerify is accepted only under a scheme that fits the leaf's key, and for
// an ML-DSA key exactly one does (crypto/tls signatureSchemesForPublicKey): "peer_scheme"
// is that scheme, so a completed handshake over an ML-DSA-65 leaf proves mldsa65.
// Standard library only, so the module builds from the toolchain alone. Any failure is
// one line on stderr and exit status 1.
package main

import (
	"bufio"
	"crypto/mldsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage("usage: mldsapeer client|server|verify -dir SVID_DIR [flags]")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	dir := flags.String("dir", "", "directory with svid.pem, svid.key, bundle.pem")
	connect := flags.String("connect", "", "client: the server's address")
	listen := flags.String("listen", "127.0.0.1:0", "server: where to listen")
	timeout := flags.Duration("timeout", 20*time.Second, "deadline for the connection")
	if err := flags.Parse(os.Args[2:]); err != nil {
		usage("%v", err)
	}
	if *dir == "" {
		usage("-dir is required")
	}
	roots := loadBundle(*dir)
	switch os.Args[1] {
	case "verify":
		chain := loadChain(*dir)
		if err := verifyChain(chain, roots); err != nil {
			fail("verify", err)
		}
		line("verified", map[string]any{"chain": signatureAlgorithms(chain)})
	case "client":
		if *connect == "" {
			usage("client needs -connect")
		}
		runClient(config(*dir, roots), *connect, *timeout)
	case "server":
		runServer(config(*dir, roots), *listen, *timeout)
	default:
		usage("unknown command %q (client, server, verify)", os.Args[1])
	}
}

func line(name string, fields map[string]any) {
	fields["event"] = name
	data, err := json.Marshal(fields)
	if err != nil {
		fail("emit", err)
	}
	os.Stdout.Write(append(data, '\n'))
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "mldsapeer: %s: %s\n", what, strings.ReplaceAll(err.Error(), "\n", " "))
	os.Exit(1)
}

func usage(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "mldsapeer: %s\n", fmt.Sprintf(format, args...))
	os.Exit(2)
}

func loadBundle(dir string) *x509.CertPool {
	roots := x509.NewCertPool()
	bundle, err := os.ReadFile(filepath.Join(dir, "bundle.pem"))
	if err != nil {
		fail("load bundle", err)
	}
	if !roots.AppendCertsFromPEM(bundle) {
		fail("load bundle", errors.New("no certificates in bundle.pem"))
	}
	return roots
}

func loadChain(dir string) []*x509.Certificate {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid.key"))
	if err != nil {
		fail("load SVID", err)
	}
	chain := make([]*x509.Certificate, 0, len(cert.Certificate))
	for _, der := range cert.Certificate {
		parsed, err := x509.ParseCertificate(der)
		if err != nil {
			fail("parse SVID", err)
		}
		chain = append(chain, parsed)
	}
	return chain
}

func config(dir string, roots *x509.CertPool) *tls.Config {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid.key"))
	if err != nil {
		fail("load SVID", err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAnyClientCert,
		// SPIFFE peers have no DNS name: the chain is verified in VerifyConnection.
		InsecureSkipVerify: true,
		VerifyConnection: func(state tls.ConnectionState) error {
			return verifyChain(state.PeerCertificates, roots)
		},
	}
}

// verifyChain checks the chain to the bundle the way go-spiffe does (any EKU purpose,
// intermediates from the peer) and insists on one spiffe:// URI SAN.
func verifyChain(chain []*x509.Certificate, roots *x509.CertPool) error {
	if len(chain) == 0 {
		return errors.New("no certificate")
	}
	intermediates := x509.NewCertPool()
	for _, cert := range chain[1:] {
		intermediates.AddCert(cert)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: intermediates,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("peer chain: %w", err)
	}
	if len(chain[0].URIs) != 1 || chain[0].URIs[0].Scheme != "spiffe" {
		return errors.New("leaf has no single spiffe:// URI SAN")
	}
	return nil
}

func signatureAlgorithms(chain []*x509.Certificate) []string {
	out := make([]string, 0, len(chain))
	for _, cert := range chain {
		out = append(out, cert.SignatureAlgorithm.String())
	}
	return out
}

// peerScheme is the one TLS 1.3 scheme crypto/tls accepts a CertificateVerify under
// for this leaf key, when there is exactly one (ML-DSA, Ed25519); "" otherwise.
func peerScheme(leaf *x509.Certificate) string {
	switch pub := leaf.PublicKey.(type) {
	case *mldsa.PublicKey:
		switch pub.Parameters() {
		case mldsa.MLDSA44():
			return tls.MLDSA44.String()
		case mldsa.MLDSA65():
			return tls.MLDSA65.String()
		case mldsa.MLDSA87():
			return tls.MLDSA87.String()
		}
	}
	return ""
}

func report(role string, conn *tls.Conn) {
	state := conn.ConnectionState()
	leaf := state.PeerCertificates[0]
	key := leaf.PublicKeyAlgorithm.String()
	if pub, ok := leaf.PublicKey.(*mldsa.PublicKey); ok {
		key = pub.Parameters().String()
	}
	line("handshake", map[string]any{
		"role":        role,
		"version":     tls.VersionName(state.Version),
		"group":       state.CurveID.String(),
		"peer_id":     leaf.URIs[0].String(),
		"peer_key":    key,
		"peer_scheme": peerScheme(leaf),
		"peer_chain":  signatureAlgorithms(state.PeerCertificates),
	})
}

func runClient(config *tls.Config, addr string, timeout time.Duration) {
	raw, err := (&net.Dialer{Timeout: timeout}).Dial("tcp", addr)
	if err != nil {
		fail("dial", err)
	}
	_ = raw.SetDeadline(time.Now().Add(timeout))
	conn := tls.Client(raw, config)
	defer conn.Close()
	if err := conn.Handshake(); err != nil {
		fail("handshake", err)
	}
	report("client", conn)
	if _, err := conn.Write([]byte("ping from go\n")); err != nil {
		fail("write", err)
	}
	echo, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		fail("read", err)
	}
	line("done", map[string]any{"echo": echo})
}

func runServer(config *tls.Config, listen string, timeout time.Duration) {
	listener, err := net.Listen("tcp", listen)
	if err != nil {
		fail("listen", err)
	}
	line("listening", map[string]any{"addr": listener.Addr().String()})
	raw, err := listener.Accept()
	if err != nil {
		fail("accept", err)
	}
	_ = raw.SetDeadline(time.Now().Add(timeout))
	conn := tls.Server(raw, config)
	defer conn.Close()
	if err := conn.Handshake(); err != nil {
		fail("handshake", err)
	}
	report("server", conn)
	got, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		fail("read", err)
	}
	if _, err := conn.Write([]byte(got)); err != nil {
		fail("write", err)
	}
	line("done", map[string]any{"echo": got})
}
