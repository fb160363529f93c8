module trellis.test/interop/mldsa

// crypto/mldsa, ML-DSA in crypto/x509 and in TLS 1.3 arrive in Go 1.27.
go 1.27.0
