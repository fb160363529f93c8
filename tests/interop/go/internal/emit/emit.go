// Package emit is what every peer program prints: one JSON object per line on stdout
// for what it saw, and on failure one line on stderr with the reason and exit status 1.
// The tests parse the lines and check the reasons, so both formats are a contract.
package emit

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"

	"google.golang.org/grpc/status"
)

var mu sync.Mutex

// Line prints one event: {"event": name, ...fields}.
func Line(name string, fields map[string]any) {
	out := map[string]any{"event": name}
	for k, v := range fields {
		out[k] = v
	}
	data, err := json.Marshal(out)
	if err != nil {
		Fail("emit", err)
	}
	mu.Lock()
	defer mu.Unlock()
	os.Stdout.Write(append(data, '\n'))
}

// Fail prints "<program>: <what>: <reason>" on one line and exits 1. A gRPC error's
// reason starts with its status code name (PermissionDenied, InvalidArgument, ...).
func Fail(what string, err error) {
	reason := err.Error()
	if s, ok := status.FromError(err); ok && s.Code() != 0 {
		reason = s.Code().String() + ": " + s.Message()
	}
	reason = strings.ReplaceAll(reason, "\n", " ")
	mu.Lock()
	fmt.Fprintf(os.Stderr, "%s: %s: %s\n", program(), what, reason)
	os.Exit(1)
}

// Usage reports a bad command line the same way, with exit status 2.
func Usage(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s: %s\n", program(), fmt.Sprintf(format, args...))
	os.Exit(2)
}

func program() string {
	name := os.Args[0]
	if i := strings.LastIndexByte(name, '/'); i >= 0 {
		name = name[i+1:]
	}
	return name
}
