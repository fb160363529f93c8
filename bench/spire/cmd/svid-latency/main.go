// Command svid-latency times SPIFFE Workload API calls made with go-spiffe, one after
// another over one connection, and prints the percentiles as JSON on stdout.
//
// bench/spire_compare.py runs the same binary against spire-agent and `trellis agent`,
// so the client's own cost (go-spiffe, grpc-go, parsing the SVID) is identical on both
// sides and only the agent differs.
//
//	svid-latency -socket /path/agent.sock -kind x509 -calls 2000 -warmup 200
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

type result struct {
	Kind   string  `json:"kind"`
	Calls  int     `json:"calls"`
	P50Ms  float64 `json:"p50_ms"`
	P90Ms  float64 `json:"p90_ms"`
	P99Ms  float64 `json:"p99_ms"`
	MaxMs  float64 `json:"max_ms"`
	MeanMs float64 `json:"mean_ms"`
	// SPIFFE ID of the SVID the agent returned, so a run against the wrong entry shows.
	SpiffeID string `json:"spiffe_id"`
}

func main() {
	socket := flag.String("socket", "", "Workload API Unix socket path")
	kind := flag.String("kind", "x509", "x509 (FetchX509SVID, first response) or jwt (FetchJWTSVID)")
	calls := flag.Int("calls", 2000, "timed calls")
	warmup := flag.Int("warmup", 200, "untimed calls first")
	audience := flag.String("audience", "bench", "JWT-SVID audience")
	wait := flag.Duration("wait", 60*time.Second, "how long the first call may retry while the agent syncs")
	timeout := flag.Duration("timeout", 10*time.Second, "per-call deadline")
	flag.Parse()
	if err := run(*socket, *kind, *calls, *warmup, *audience, *wait, *timeout); err != nil {
		fmt.Fprintf(os.Stderr, "svid-latency: %v\n", err)
		os.Exit(1)
	}
}

func run(socket, kind string, calls, warmup int, audience string, wait, timeout time.Duration) error {
	if socket == "" {
		return errors.New("-socket is required")
	}
	if calls < 1 || warmup < 0 {
		return errors.New("-calls must be at least 1 and -warmup not negative")
	}
	ctx := context.Background()
	client, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+socket))
	if err != nil {
		return fmt.Errorf("connect %s: %w", socket, err)
	}
	defer client.Close()

	var call func() (string, error)
	switch kind {
	case "x509":
		call = func() (string, error) {
			c, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			// One stream: open, take the first (full) response, cancel.
			svid, err := client.FetchX509SVID(c)
			if err != nil {
				return "", err
			}
			return svid.ID.String(), nil
		}
	case "jwt":
		call = func() (string, error) {
			c, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			svid, err := client.FetchJWTSVID(c, jwtsvid.Params{Audience: audience})
			if err != nil {
				return "", err
			}
			return svid.ID.String(), nil
		}
	default:
		return fmt.Errorf("-kind %q: want x509 or jwt", kind)
	}

	// The agent may still be syncing with its server: retry the first call for a while.
	deadline := time.Now().Add(wait)
	id, err := call()
	for err != nil && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		id, err = call()
	}
	if err != nil {
		return fmt.Errorf("first %s call: %w", kind, err)
	}
	for i := 0; i < warmup; i++ {
		if _, err := call(); err != nil {
			return fmt.Errorf("warm-up %s call %d: %w", kind, i, err)
		}
	}
	samples := make([]float64, calls)
	for i := range samples {
		start := time.Now()
		if _, err := call(); err != nil {
			return fmt.Errorf("%s call %d: %w", kind, i, err)
		}
		samples[i] = float64(time.Since(start).Nanoseconds()) / 1e6
	}
	sort.Float64s(samples)
	pick := func(q float64) float64 {
		return round3(samples[min(len(samples)-1, int(q*float64(len(samples))))])
	}
	sum := 0.0
	for _, s := range samples {
		sum += s
	}
	return json.NewEncoder(os.Stdout).Encode(result{
		Kind: kind, Calls: calls, SpiffeID: id,
		P50Ms: pick(0.50), P90Ms: pick(0.90), P99Ms: pick(0.99),
		MaxMs: round3(samples[len(samples)-1]), MeanMs: round3(sum / float64(len(samples))),
	})
}

func round3(v float64) float64 { return math.Round(v*1000) / 1000 }
