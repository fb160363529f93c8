// Command tlspeer is a Go crypto/tls TLS 1.3 peer for protocol interop with the Trellis
// engine, with X509-SVID files (svid.pem: leaf then intermediate, svid.key, bundle.pem).
//
//	tlspeer server -dir SVID_DIR [-listen 127.0.0.1:0] [-groups G,..] [-connections N]
//	tlspeer client -dir SVID_DIR -connect HOST:PORT [-groups G,..] [-lines N] [-resume]
//
// Both sides require and verify the peer's X509-SVID chain against bundle.pem (no DNS
// names: SPIFFE peers are named by their URI SAN) and print the negotiated parameters as
// a "handshake" JSON line. The client then sends N lines and reads each echo (the server
// echoes lines until EOF), so KeyUpdates sent by the other side land mid-stream.
// -client-auth (server) and -no-cert (client) take client authentication away.
// -groups sets CurvePreferences (default: Go's own, which for a go.mod at 1.26 is
// X25519MLKEM768, SecP256r1MLKEM768, SecP384r1MLKEM1024, X25519, P-256, P-384, P-521).
// Go has no TLS 1.3 cipher suite or signature scheme setting: the peer under test picks
// those. Any failure is one line on stderr and exit 1.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"trellis.test/interop/internal/emit"
)

var groupNames = map[string]tls.CurveID{
	"X25519MLKEM768":     tls.X25519MLKEM768,
	"SecP256r1MLKEM768":  tls.SecP256r1MLKEM768,
	"SecP384r1MLKEM1024": tls.SecP384r1MLKEM1024,
	"X25519":             tls.X25519,
	"P256":               tls.CurveP256,
	"P384":               tls.CurveP384,
	"P521":               tls.CurveP521,
}

func main() {
	if len(os.Args) < 2 {
		emit.Usage("usage: tlspeer client|server -dir SVID_DIR [flags]")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ContinueOnError)
	flags.SetOutput(io.Discard) // a bad flag is one line (emit.Usage), not the usage text
	dir := flags.String("dir", "", "directory with svid.pem, svid.key, bundle.pem")
	groups := flags.String("groups", "", "comma-separated CurvePreferences: "+names())
	expectID := flags.String("expect-id", "", "refuse a peer whose SPIFFE ID differs")
	connect := flags.String("connect", "", "client: the server's address")
	lines := flags.Int("lines", 1, "client: lines to send and read back")
	resume := flags.Bool("resume", false, "client: connect a second time offering the session ticket")
	listen := flags.String("listen", "127.0.0.1:0", "server: where to listen")
	connections := flags.Int("connections", 1, "server: connections to serve before exiting")
	timeout := flags.Duration("timeout", 20*time.Second, "deadline for each connection")
	clientAuth := flags.String("client-auth", "require", "server: require, request or none")
	noCert := flags.Bool("no-cert", false, "client: present no certificate even when asked")
	if err := flags.Parse(os.Args[2:]); err != nil {
		emit.Usage("%v", err)
	}
	if *dir == "" {
		emit.Usage("-dir is required")
	}
	config := baseConfig(*dir, *groups, *expectID)
	switch *clientAuth {
	case "require":
	case "request":
		config.ClientAuth = tls.RequestClientCert // verified by VerifyConnection if sent
	case "none":
		config.ClientAuth = tls.NoClientCert
	default:
		emit.Usage("-client-auth: %q is not require, request or none", *clientAuth)
	}
	if *noCert {
		config.Certificates = nil
	}
	switch os.Args[1] {
	case "client":
		if *connect == "" {
			emit.Usage("client needs -connect")
		}
		if *resume {
			config.ClientSessionCache = tls.NewLRUClientSessionCache(4)
		}
		runClient(config, *connect, *lines, *timeout)
		if *resume {
			runClient(config, *connect, *lines, *timeout)
		}
	case "server":
		runServer(config, *listen, *connections, *timeout)
	default:
		emit.Usage("unknown command %q (client, server)", os.Args[1])
	}
}

func names() string {
	out := []string{}
	for name := range groupNames {
		out = append(out, name)
	}
	return strings.Join(out, ", ")
}

func baseConfig(dir, groups, expectID string) *tls.Config {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "svid.pem"), filepath.Join(dir, "svid.key"))
	if err != nil {
		emit.Fail("load SVID", err)
	}
	roots := x509.NewCertPool()
	bundle, err := os.ReadFile(filepath.Join(dir, "bundle.pem"))
	if err != nil {
		emit.Fail("load bundle", err)
	}
	if !roots.AppendCertsFromPEM(bundle) {
		emit.Fail("load bundle", errors.New("no certificates in bundle.pem"))
	}
	config := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAnyClientCert,
		// SPIFFE peers have no DNS name to check: the chain and the URI SAN are verified
		// in VerifyConnection instead (as go-spiffe's tlsconfig does).
		InsecureSkipVerify: true,
	}
	config.VerifyConnection = func(state tls.ConnectionState) error {
		if len(state.PeerCertificates) == 0 && config.ClientAuth != tls.RequireAnyClientCert {
			return nil // a server that did not require a certificate got none
		}
		_, err := verifySVID(state.PeerCertificates, roots, expectID)
		return err
	}
	if groups != "" {
		for _, name := range strings.Split(groups, ",") {
			id, ok := groupNames[strings.TrimSpace(name)]
			if !ok {
				emit.Usage("-groups: unknown group %q (known: %s)", name, names())
			}
			config.CurvePreferences = append(config.CurvePreferences, id)
		}
	}
	return config
}

// verifySVID checks the chain to the bundle (any purpose: SVIDs carry both serverAuth
// and clientAuth) and returns the leaf's single URI SAN.
func verifySVID(chain []*x509.Certificate, roots *x509.CertPool, expectID string) (string, error) {
	if len(chain) == 0 {
		return "", errors.New("the peer sent no certificate")
	}
	intermediates := x509.NewCertPool()
	for _, cert := range chain[1:] {
		intermediates.AddCert(cert)
	}
	leaf := chain[0]
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: intermediates,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return "", fmt.Errorf("peer chain: %w", err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].Scheme != "spiffe" {
		return "", errors.New("the peer's leaf has no single spiffe:// URI SAN")
	}
	id := leaf.URIs[0].String()
	if expectID != "" && id != expectID {
		return "", fmt.Errorf("unexpected peer ID %s (want %s)", id, expectID)
	}
	return id, nil
}

func report(role string, conn *tls.Conn) {
	state := conn.ConnectionState()
	peerID := ""
	if len(state.PeerCertificates) > 0 && len(state.PeerCertificates[0].URIs) == 1 {
		peerID = state.PeerCertificates[0].URIs[0].String()
	}
	leafKey := ""
	if len(state.PeerCertificates) > 0 {
		leafKey = state.PeerCertificates[0].PublicKeyAlgorithm.String()
	}
	emit.Line("handshake", map[string]any{
		"role":           role,
		"version":        tls.VersionName(state.Version),
		"suite":          tls.CipherSuiteName(state.CipherSuite),
		"group":          state.CurveID.String(),
		"hello_retry":    state.HelloRetryRequest,
		"did_resume":     state.DidResume,
		"peer_id":        peerID,
		"peer_key":       leafKey,
		"peer_chain_len": len(state.PeerCertificates),
	})
}

func runClient(config *tls.Config, addr string, lines int, timeout time.Duration) {
	dialer := &net.Dialer{Timeout: timeout}
	raw, err := dialer.Dial("tcp", addr)
	if err != nil {
		emit.Fail("dial", err)
	}
	_ = raw.SetDeadline(time.Now().Add(timeout))
	conn := tls.Client(raw, config)
	defer conn.Close()
	if err := conn.Handshake(); err != nil {
		emit.Fail("handshake", err)
	}
	report("client", conn)
	reader := bufio.NewReader(conn)
	for i := 0; i < lines; i++ {
		line := fmt.Sprintf("line %d from go\n", i)
		if _, err := conn.Write([]byte(line)); err != nil {
			emit.Fail("write", err)
		}
		echo, err := reader.ReadString('\n')
		if err != nil {
			emit.Fail("read", err)
		}
		if echo != line {
			emit.Fail("read", fmt.Errorf("echo %q, sent %q", echo, line))
		}
	}
	if err := conn.CloseWrite(); err != nil {
		emit.Fail("close_notify", err)
	}
	emit.Line("done", map[string]any{"lines": lines})
}

func runServer(config *tls.Config, listen string, connections int, timeout time.Duration) {
	listener, err := net.Listen("tcp", listen)
	if err != nil {
		emit.Fail("listen", err)
	}
	emit.Line("listening", map[string]any{"addr": listener.Addr().String()})
	for i := 0; i < connections; i++ {
		raw, err := listener.Accept()
		if err != nil {
			emit.Fail("accept", err)
		}
		_ = raw.SetDeadline(time.Now().Add(timeout))
		conn := tls.Server(raw, config)
		if err := conn.Handshake(); err != nil {
			emit.Fail("handshake", err)
		}
		report("server", conn)
		reader := bufio.NewReader(conn)
		echoed := 0
		for {
			line, err := reader.ReadString('\n')
			if line != "" {
				if _, werr := conn.Write([]byte(line)); werr != nil {
					emit.Fail("write", werr)
				}
				echoed++
			}
			if err != nil {
				// A clean close_notify reads as io.EOF; anything else is a failure.
				if !errors.Is(err, io.EOF) {
					emit.Fail("read", err)
				}
				break
			}
		}
		conn.Close()
		emit.Line("done", map[string]any{"lines": echoed})
	}
}
