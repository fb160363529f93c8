module trellis.test/interop/pq

// Go 1.27 is the first with ML-DSA (FIPS 204) in crypto/x509; an older go command
// switches to it (GOTOOLCHAIN=auto) or refuses to build, never builds a verifier without it.
go 1.27.0
