// Command echpeer is a Go crypto/tls peer for Encrypted ClientHello (RFC 9849) interop
// with the Trellis engine. DIR holds the X509-SVID files tlspeer reads (svid.pem,
// svid.key, bundle.pem) and the ECH public name's certificate (public.pem, public.key,
// public-root.pem).
//
//	echpeer server -dir DIR -ech-keys FILE [-listen 127.0.0.1:0] [-connections N]
//	echpeer client -dir DIR -connect HOST:PORT -server-name NAME -ech-config-list HEX [-retry]
//
// The server's ECH keys file is JSON: [{"config": HEX, "private_key": HEX,
// "send_as_retry": BOOL}, ...] (one ECHConfig and its raw X25519 key each). The server
// presents the public name's certificate to a hello for the public name and the SVID
// otherwise; it requires the client's SVID. The client verifies the server's SVID (or,
// on a rejection, Go checks the public name against public-root.pem itself), reports
// what it saw, and with -retry connects once more with the rejection's retry configs.
// Each handshake is a "handshake" JSON line with ech_accepted and server_name; a
// rejection is an "ech_rejected" line with the retry configs in hex. Any other failure
// is one line on stderr and exit 1.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"trellis.test/interop/internal/emit"
)

type keyFile struct {
	Config      string `json:"config"`
	PrivateKey  string `json:"private_key"`
	SendAsRetry bool   `json:"send_as_retry"`
}

func main() {
	if len(os.Args) < 2 {
		emit.Usage("usage: echpeer client|server -dir DIR [flags]")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	dir := flags.String("dir", "", "directory with the SVID and public name files")
	echKeys := flags.String("ech-keys", "", "server: JSON file of ECH keys (none: no ECH)")
	listen := flags.String("listen", "127.0.0.1:0", "server: where to listen")
	connections := flags.Int("connections", 1, "server: connections to serve before exiting")
	connect := flags.String("connect", "", "client: the server's address")
	serverName := flags.String("server-name", "", "client: the inner server name")
	configList := flags.String("ech-config-list", "", "client: ECHConfigList in hex")
	retry := flags.Bool("retry", false, "client: on rejection, connect again with retry configs")
	timeout := flags.Duration("timeout", 20*time.Second, "deadline for each connection")
	if err := flags.Parse(os.Args[2:]); err != nil {
		emit.Usage("%v", err)
	}
	if *dir == "" {
		emit.Usage("-dir is required")
	}
	svid, err := tls.LoadX509KeyPair(filepath.Join(*dir, "svid.pem"), filepath.Join(*dir, "svid.key"))
	if err != nil {
		emit.Fail("load SVID", err)
	}
	bundle := pool(filepath.Join(*dir, "bundle.pem"))
	config := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{svid},
		ClientAuth:   tls.RequireAnyClientCert,
		// SPIFFE peers have no DNS name: the chain is checked in VerifyConnection. A
		// rejected ECH handshake is checked by Go against RootCAs and the public name.
		InsecureSkipVerify: true,
		RootCAs:            pool(filepath.Join(*dir, "public-root.pem")),
	}
	config.VerifyConnection = func(state tls.ConnectionState) error {
		if len(state.PeerCertificates) == 0 {
			return errors.New("the peer sent no certificate")
		}
		intermediates := x509.NewCertPool()
		for _, cert := range state.PeerCertificates[1:] {
			intermediates.AddCert(cert)
		}
		_, err := state.PeerCertificates[0].Verify(x509.VerifyOptions{
			Roots: bundle, Intermediates: intermediates,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		})
		return err
	}
	switch os.Args[1] {
	case "server":
		public, err := tls.LoadX509KeyPair(filepath.Join(*dir, "public.pem"), filepath.Join(*dir, "public.key"))
		if err != nil {
			emit.Fail("load public name certificate", err)
		}
		publicName := public.Leaf.DNSNames[0]
		config.GetCertificate = func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			if hello.ServerName == publicName {
				return &public, nil
			}
			return &svid, nil
		}
		if *echKeys != "" {
			config.EncryptedClientHelloKeys = loadKeys(*echKeys)
		}
		runServer(config, *listen, *connections, *timeout)
	case "client":
		if *connect == "" || *serverName == "" || *configList == "" {
			emit.Usage("client needs -connect, -server-name and -ech-config-list")
		}
		list, err := hex.DecodeString(*configList)
		if err != nil {
			emit.Usage("-ech-config-list: %v", err)
		}
		config.ServerName = *serverName
		config.EncryptedClientHelloConfigList = list
		retryList := runClient(config, *connect, *timeout)
		if retryList != nil && *retry {
			config.EncryptedClientHelloConfigList = retryList
			if runClient(config, *connect, *timeout) != nil {
				emit.Fail("retry", errors.New("rejected again"))
			}
		}
	default:
		emit.Usage("unknown command %q (client, server)", os.Args[1])
	}
}

func pool(path string) *x509.CertPool {
	data, err := os.ReadFile(path)
	if err != nil {
		emit.Fail("load roots", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(data) {
		emit.Fail("load roots", errors.New("no certificates in "+path))
	}
	return roots
}

func loadKeys(path string) []tls.EncryptedClientHelloKey {
	data, err := os.ReadFile(path)
	if err != nil {
		emit.Fail("load ECH keys", err)
	}
	var files []keyFile
	if err := json.Unmarshal(data, &files); err != nil {
		emit.Fail("load ECH keys", err)
	}
	keys := []tls.EncryptedClientHelloKey{}
	for _, f := range files {
		config, err1 := hex.DecodeString(f.Config)
		key, err2 := hex.DecodeString(f.PrivateKey)
		if err := errors.Join(err1, err2); err != nil {
			emit.Fail("load ECH keys", err)
		}
		keys = append(keys, tls.EncryptedClientHelloKey{Config: config, PrivateKey: key, SendAsRetry: f.SendAsRetry})
	}
	return keys
}

func report(role string, conn *tls.Conn) {
	state := conn.ConnectionState()
	emit.Line("handshake", map[string]any{
		"role":         role,
		"version":      tls.VersionName(state.Version),
		"ech_accepted": state.ECHAccepted,
		"server_name":  state.ServerName,
		"hello_retry":  state.HelloRetryRequest,
		"did_resume":   state.DidResume,
	})
}

// runClient handshakes once; it returns the retry configs of a rejection (else nil).
func runClient(config *tls.Config, addr string, timeout time.Duration) []byte {
	raw, err := (&net.Dialer{Timeout: timeout}).Dial("tcp", addr)
	if err != nil {
		emit.Fail("dial", err)
	}
	_ = raw.SetDeadline(time.Now().Add(timeout))
	conn := tls.Client(raw, config)
	defer conn.Close()
	if err := conn.Handshake(); err != nil {
		var rejection *tls.ECHRejectionError
		if errors.As(err, &rejection) {
			emit.Line("ech_rejected", map[string]any{"retry_configs": hex.EncodeToString(rejection.RetryConfigList)})
			if rejection.RetryConfigList == nil {
				emit.Fail("handshake", err)
			}
			return rejection.RetryConfigList
		}
		emit.Fail("handshake", err)
	}
	report("client", conn)
	return nil
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
			// A client that rejects ECH ends the handshake with ech_required: reported,
			// and the server goes on to the client's retry.
			emit.Line("handshake_failed", map[string]any{"error": err.Error()})
			conn.Close()
			continue
		}
		report("server", conn)
		_, _ = io.Copy(io.Discard, conn)
		conn.Close()
	}
}
