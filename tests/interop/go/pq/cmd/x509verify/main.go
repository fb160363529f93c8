// Command x509verify checks an X.509 chain with Go's crypto/x509 alone, so Trellis's
// certificates are judged by a verifier that shares no code with OpenSSL or cryptography.
//
//	x509verify -roots bundle.pem -chain svid.pem
//
// The chain file holds the leaf first, then intermediates. It prints one JSON line,
// {"verified":true,"chain":["ML-DSA-65",...]} or {"verified":false,"error":"..."}, and
// exits 0 when the chain verifies, 1 when it does not, 2 on bad input.
package main

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"os"
)

type result struct {
	Verified bool     `json:"verified"`
	Chain    []string `json:"chain,omitempty"`
	Error    string   `json:"error,omitempty"`
}

func readCerts(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		certs = append(certs, cert)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s: no certificate", path)
	}
	return certs, nil
}

func emit(r result, code int) {
	line, _ := json.Marshal(r)
	fmt.Println(string(line))
	os.Exit(code)
}

func main() {
	rootsPath := flag.String("roots", "", "PEM trust anchors")
	chainPath := flag.String("chain", "", "PEM chain, leaf first")
	flag.Parse()
	roots, err := readCerts(*rootsPath)
	if err != nil {
		emit(result{Error: err.Error()}, 2)
	}
	chain, err := readCerts(*chainPath)
	if err != nil {
		// A certificate Go cannot parse is a refusal by Go, not bad input.
		emit(result{Error: err.Error()}, 1)
	}
	pool := x509.NewCertPool()
	for _, root := range roots {
		pool.AddCert(root)
	}
	intermediates := x509.NewCertPool()
	for _, cert := range chain[1:] {
		intermediates.AddCert(cert)
	}
	// SPIFFE leaves carry serverAuth and clientAuth; either is what a TLS peer checks.
	chains, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: intermediates,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		emit(result{Error: err.Error()}, 1)
	}
	var algorithms []string
	for _, cert := range chains[0] {
		algorithms = append(algorithms, cert.SignatureAlgorithm.String())
	}
	emit(result{Verified: true, Chain: algorithms}, 0)
}
