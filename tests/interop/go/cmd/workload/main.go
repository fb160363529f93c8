// Command workload is a SPIFFE workload written with go-spiffe, the reference SPIFFE
// library, talking to the Workload API at $SPIFFE_ENDPOINT_SOCKET (or -addr).
//
//	workload x509            FetchX509Context, FetchX509Bundles and an X509Source
//	workload watch -updates N  WatchX509Context until N distinct SVIDs arrived
//	workload jwt -audience A   a JWTSource's FetchJWTSVID, ValidateJWTSVID on the agent,
//	                           and local validation against the JWT bundle
//
// Each prints what it saw as JSON lines; any failure is one line on stderr, exit 1.
package main

import (
	"context"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"trellis.test/interop/internal/emit"
)

func main() {
	if len(os.Args) < 2 {
		emit.Usage("usage: workload x509|watch|jwt [flags]")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ContinueOnError)
	flags.SetOutput(io.Discard) // a bad flag is one line (emit.Usage), not the usage text
	addr := flags.String("addr", "", "Workload API address (default: $SPIFFE_ENDPOINT_SOCKET)")
	timeout := flags.Duration("timeout", 20*time.Second, "give up after this long")
	updates := flags.Int("updates", 2, "watch: distinct SVIDs to wait for")
	audience := flags.String("audience", "trellis-test", "jwt: the JWT-SVID audience")
	if err := flags.Parse(os.Args[2:]); err != nil {
		emit.Usage("%v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var options []workloadapi.ClientOption
	if *addr != "" {
		options = append(options, workloadapi.WithAddr(*addr))
	}
	switch os.Args[1] {
	case "x509":
		fetchX509(ctx, options)
	case "watch":
		watch(ctx, options, *updates)
	case "jwt":
		fetchJWT(ctx, options, *audience)
	default:
		emit.Usage("unknown command %q (x509, watch, jwt)", os.Args[1])
	}
}

func svidFields(svid *x509svid.SVID) map[string]any {
	leaf := svid.Certificates[0]
	return map[string]any{
		"spiffe_id": svid.ID.String(),
		"chain_len": len(svid.Certificates),
		"serial":    hex.EncodeToString(leaf.SerialNumber.Bytes()),
		"not_after": leaf.NotAfter.UTC().Format(time.RFC3339),
	}
}

// bundleSummary maps each trust domain to its number of X.509 authorities.
func bundleSummary(set *x509bundle.Set) map[string]int {
	out := map[string]int{}
	for _, bundle := range set.Bundles() {
		out[bundle.TrustDomain().String()] = len(bundle.X509Authorities())
	}
	return out
}

func fetchX509(ctx context.Context, options []workloadapi.ClientOption) {
	// The one-shot calls first: they return the agent's status (PermissionDenied, ...)
	// where a source would keep retrying until its context ends.
	x509Context, err := workloadapi.FetchX509Context(ctx, options...)
	if err != nil {
		emit.Fail("FetchX509Context", err)
	}
	ids := []string{}
	for _, svid := range x509Context.SVIDs {
		ids = append(ids, svid.ID.String())
	}
	sort.Strings(ids)
	emit.Line("x509_context", map[string]any{
		"spiffe_ids": ids,
		"bundles":    bundleSummary(x509Context.Bundles),
	})
	bundles, err := workloadapi.FetchX509Bundles(ctx, options...)
	if err != nil {
		emit.Fail("FetchX509Bundles", err)
	}
	emit.Line("x509_bundles", map[string]any{"bundles": bundleSummary(bundles)})

	source, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(options...))
	if err != nil {
		emit.Fail("NewX509Source", err)
	}
	defer source.Close()
	svid, err := source.GetX509SVID()
	if err != nil {
		emit.Fail("X509Source.GetX509SVID", err)
	}
	fields := svidFields(svid)
	bundle, err := source.GetX509BundleForTrustDomain(svid.ID.TrustDomain())
	if err != nil {
		emit.Fail("X509Source.GetX509BundleForTrustDomain", err)
	}
	// The SVID must verify against the bundle the same source delivered.
	if _, _, err := x509svid.Verify(svid.Certificates, source); err != nil {
		emit.Fail("x509svid.Verify", err)
	}
	fields["own_bundle_authorities"] = len(bundle.X509Authorities())
	fields["verified"] = true
	emit.Line("x509_source", fields)
}

type watcher struct {
	want    int
	seen    map[string]bool
	done    chan struct{}
	lastErr chan error
}

func (w *watcher) OnX509ContextUpdate(x509Context *workloadapi.X509Context) {
	svid := x509Context.DefaultSVID()
	fields := svidFields(svid)
	serial := fields["serial"].(string)
	fields["bundles"] = bundleSummary(x509Context.Bundles)
	fields["received"] = time.Now().UTC().Format(time.RFC3339Nano)
	emit.Line("x509_update", fields)
	if !w.seen[serial] {
		w.seen[serial] = true
		if len(w.seen) == w.want {
			close(w.done)
		}
	}
}

// OnX509ContextWatchError sees every error, also those go-spiffe retries after (an
// agent restart): each is a line, and the last one is the reason if the watch times out.
func (w *watcher) OnX509ContextWatchError(err error) {
	emit.Line("watch_error", map[string]any{"reason": err.Error()})
	select {
	case <-w.lastErr:
	default:
	}
	w.lastErr <- err
}

func watch(ctx context.Context, options []workloadapi.ClientOption, updates int) {
	w := &watcher{want: updates, seen: map[string]bool{}, done: make(chan struct{}), lastErr: make(chan error, 1)}
	watchCtx, stop := context.WithCancel(ctx)
	defer stop()
	stopped := make(chan error, 1)
	go func() { stopped <- workloadapi.WatchX509Context(watchCtx, w, options...) }()
	select {
	case <-w.done:
		emit.Line("watch_done", map[string]any{"distinct": len(w.seen)})
	case err := <-stopped: // a status go-spiffe does not retry (InvalidArgument)
		emit.Fail("WatchX509Context", err)
	case <-ctx.Done():
		select {
		case err := <-w.lastErr:
			emit.Fail("WatchX509Context", err)
		default:
			emit.Fail("WatchX509Context", fmt.Errorf("%d of %d distinct SVIDs before the deadline", len(w.seen), w.want))
		}
	}
}

func fetchJWT(ctx context.Context, options []workloadapi.ClientOption, audience string) {
	source, err := workloadapi.NewJWTSource(ctx, workloadapi.WithClientOptions(options...))
	if err != nil {
		emit.Fail("NewJWTSource", err)
	}
	defer source.Close()
	svid, err := source.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience})
	if err != nil {
		emit.Fail("JWTSource.FetchJWTSVID", err)
	}
	fields := map[string]any{
		"spiffe_id": svid.ID.String(),
		"audience":  svid.Audience,
		"expiry":    svid.Expiry.UTC().Format(time.RFC3339),
	}
	// The agent validates it (ValidateJWTSVID)...
	validated, err := workloadapi.ValidateJWTSVID(ctx, svid.Marshal(), audience, options...)
	if err != nil {
		emit.Fail("ValidateJWTSVID", err)
	}
	fields["validated_id"] = validated.ID.String()
	// ...and so does go-spiffe itself, with the JWT bundle from the same source.
	local, err := jwtsvid.ParseAndValidate(svid.Marshal(), source, []string{audience})
	if err != nil {
		emit.Fail("jwtsvid.ParseAndValidate", err)
	}
	fields["locally_validated_id"] = local.ID.String()
	// A token for another audience must be refused by the agent.
	if _, err := workloadapi.ValidateJWTSVID(ctx, svid.Marshal(), audience+"-other", options...); err == nil {
		emit.Fail("ValidateJWTSVID", errorString("a token for another audience was accepted"))
	} else {
		fields["wrong_audience_error"] = err.Error()
	}
	emit.Line("jwt", fields)
}

type errorString string

func (e errorString) Error() string { return string(e) }
