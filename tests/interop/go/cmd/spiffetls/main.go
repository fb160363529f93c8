// Command spiffetls is a go-spiffe mTLS peer (spiffetls with tlsconfig authorizers)
// whose SVIDs come from the Workload API at $SPIFFE_ENDPOINT_SOCKET. It speaks what a
// Trellis sidecar speaks on its inbound port: HTTP/2 CONNECT tunnels (HBONE) with ALPN h2.
//
//	spiffetls client [-addr unix:///agent.sock] -connect HOST:PORT -target AUTHORITY (-id ID | -member-of TD) [-message M]
//	    dials, opens one CONNECT tunnel to AUTHORITY, sends M, half-closes, prints the echo.
//	spiffetls server -listen HOST:PORT (-id ID | -member-of TD)
//	    accepts connections and echoes each CONNECT tunnel, until killed.
//
// Output is JSON lines; a client failure is one line on stderr and exit 1. The server
// reports a refused handshake as a "refused" line and keeps serving.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"golang.org/x/net/http2"

	"trellis.test/interop/internal/emit"
)

func main() {
	if len(os.Args) < 2 {
		emit.Usage("usage: spiffetls client|server [flags]")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ContinueOnError)
	flags.SetOutput(io.Discard) // a bad flag is one line (emit.Usage), not the usage text
	id := flags.String("id", "", "authorize exactly this peer SPIFFE ID (tlsconfig.AuthorizeID)")
	memberOf := flags.String("member-of", "", "authorize any peer of this trust domain (tlsconfig.AuthorizeMemberOf)")
	connect := flags.String("connect", "", "client: the sidecar's inbound address")
	target := flags.String("target", "", "client: the CONNECT authority (service:port behind the sidecar)")
	message := flags.String("message", "hello from go-spiffe", "client: what to send through the tunnel")
	listen := flags.String("listen", "127.0.0.1:0", "server: where to listen")
	timeout := flags.Duration("timeout", 20*time.Second, "client: give up after this long")
	addr := flags.String("addr", "", "Workload API address (default: $SPIFFE_ENDPOINT_SOCKET)")
	if err := flags.Parse(os.Args[2:]); err != nil {
		emit.Usage("%v", err)
	}
	authorizer := authorizerFrom(*id, *memberOf)
	if *addr != "" {
		sourceOptions = append(sourceOptions, workloadapi.WithClientOptions(workloadapi.WithAddr(*addr)))
	}
	switch os.Args[1] {
	case "client":
		if *connect == "" || *target == "" {
			emit.Usage("client needs -connect and -target")
		}
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		defer cancel()
		client(ctx, authorizer, *connect, *target, *message)
	case "server":
		server(authorizer, *listen)
	default:
		emit.Usage("unknown command %q (client, server)", os.Args[1])
	}
}

func authorizerFrom(id, memberOf string) tlsconfig.Authorizer {
	switch {
	case id != "" && memberOf == "":
		parsed, err := spiffeid.FromString(id)
		if err != nil {
			emit.Usage("-id: %v", err)
		}
		return tlsconfig.AuthorizeID(parsed)
	case memberOf != "" && id == "":
		td, err := spiffeid.TrustDomainFromString(memberOf)
		if err != nil {
			emit.Usage("-member-of: %v", err)
		}
		return tlsconfig.AuthorizeMemberOf(td)
	default:
		emit.Usage("give exactly one of -id and -member-of")
		return nil
	}
}

var sourceOptions []workloadapi.X509SourceOption

func source(ctx context.Context) *workloadapi.X509Source {
	src, err := workloadapi.NewX509Source(ctx, sourceOptions...)
	if err != nil {
		emit.Fail("NewX509Source", err)
	}
	return src
}

func client(ctx context.Context, authorizer tlsconfig.Authorizer, connect, target, message string) {
	src := source(ctx)
	defer src.Close()
	own, err := src.GetX509SVID()
	if err != nil {
		emit.Fail("X509Source.GetX509SVID", err)
	}
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	conn, err := spiffetls.DialWithMode(ctx, "tcp", connect,
		spiffetls.MTLSClientWithSource(authorizer, src),
		spiffetls.WithDialTLSConfigBase(&tls.Config{NextProtos: []string{"h2"}}),
		spiffetls.WithDialer(dialer),
	)
	if err != nil {
		emit.Fail("dial", err)
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(deadline)
	}
	tlsConn := conn.(interface {
		PeerID() (spiffeid.ID, error)
		ConnectionState() tls.ConnectionState
	})
	peer, err := tlsConn.PeerID()
	if err != nil {
		emit.Fail("handshake", err)
	}
	state := tlsConn.ConnectionState()
	emit.Line("connected", map[string]any{
		"own_id":  own.ID.String(),
		"peer_id": peer.String(),
		"alpn":    state.NegotiatedProtocol,
		"group":   state.CurveID.String(),
	})
	if state.NegotiatedProtocol != "h2" {
		emit.Fail("alpn", fmt.Errorf("the peer chose %q, not h2", state.NegotiatedProtocol))
	}
	cc, err := (&http2.Transport{}).NewClientConn(conn)
	if err != nil {
		emit.Fail("http2", err)
	}
	body, bodyWriter := io.Pipe()
	// RFC 9113 §8.5: CONNECT carries only :method and :authority.
	req := (&http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Host: target},
		Host:   target,
		Header: http.Header{},
		Body:   body,
	}).WithContext(ctx)
	resp, err := cc.RoundTrip(req)
	if err != nil {
		emit.Fail("CONNECT", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		emit.Fail("CONNECT", fmt.Errorf("refused with HTTP %d", resp.StatusCode))
	}
	go func() {
		_, _ = bodyWriter.Write([]byte(message))
		_ = bodyWriter.Close()
	}()
	echo, err := io.ReadAll(resp.Body)
	if err != nil {
		emit.Fail("tunnel", err)
	}
	emit.Line("tunnel", map[string]any{"status": resp.StatusCode, "echo": string(echo)})
}

func server(authorizer tlsconfig.Authorizer, listen string) {
	ctx := context.Background()
	startup, cancel := context.WithTimeout(ctx, 20*time.Second)
	src := source(startup)
	cancel()
	defer src.Close()
	own, err := src.GetX509SVID()
	if err != nil {
		emit.Fail("X509Source.GetX509SVID", err)
	}
	listener, err := spiffetls.ListenWithMode(ctx, "tcp", listen,
		spiffetls.MTLSServerWithSource(authorizer, src),
		spiffetls.WithListenTLSConfigBase(&tls.Config{NextProtos: []string{"h2"}}),
	)
	if err != nil {
		emit.Fail("listen", err)
	}
	emit.Line("listening", map[string]any{"addr": listener.Addr().String(), "own_id": own.ID.String()})
	h2 := &http2.Server{}
	for {
		conn, err := listener.Accept()
		if err != nil {
			emit.Fail("accept", err)
		}
		go serve(h2, conn)
	}
}

func serve(h2 *http2.Server, conn net.Conn) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	tlsConn := conn.(interface {
		PeerID() (spiffeid.ID, error)
		ConnectionState() tls.ConnectionState
	})
	peer, err := tlsConn.PeerID()
	if err != nil {
		emit.Line("refused", map[string]any{"reason": err.Error()})
		return
	}
	emit.Line("accepted", map[string]any{
		"peer_id": peer.String(),
		"alpn":    tlsConn.ConnectionState().NegotiatedProtocol,
		"group":   tlsConn.ConnectionState().CurveID.String(),
	})
	h2.ServeConn(conn, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodConnect {
			http.Error(w, "CONNECT only", http.StatusMethodNotAllowed)
			return
		}
		emit.Line("tunnel", map[string]any{"authority": r.Host, "peer_id": peer.String()})
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		buf := make([]byte, 32*1024)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return
				}
				w.(http.Flusher).Flush()
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					emit.Line("tunnel_error", map[string]any{"reason": err.Error()})
				}
				return
			}
		}
	})})
}
