package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	pb "k8s.io/kms/apis/v2"
)

// dial connects the way kube-apiserver's KMS v2 client does (envelope/kmsv2/grpc_service.go):
// insecure credentials on a unix socket, authority "localhost", WaitForReady on every call.
func dial(target string) (*grpc.ClientConn, error) {
	return grpc.NewClient(target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithAuthority("localhost"),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)))
}

func waitConnected(conn *grpc.ClientConn, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn.Connect()
	for state := conn.GetState(); state != connectivity.Ready; state = conn.GetState() {
		if !conn.WaitForStateChange(ctx, state) {
			return fmt.Errorf("no connection to the plugin within %s (state %s)", timeout, state)
		}
	}
	return nil
}

// seedEntry is one seed the plugin wrapped, with what the apiserver would store in etcd.
type seedEntry struct {
	Seed        []byte            `json:"seed"`
	Ciphertext  []byte            `json:"ciphertext"`
	KeyID       string            `json:"key_id"`
	Annotations map[string][]byte `json:"annotations"`
}

func newSeed() []byte {
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
		panic(err)
	}
	return seed
}

// call is one KMS v2 request; it returns an error label ("" = success).
type call func(ctx context.Context, i int64) string

func codeOf(err error) string {
	if s, ok := status.FromError(err); ok {
		return s.Code().String()
	}
	return "TRANSPORT"
}

func makeCall(op string, client pb.KeyManagementServiceClient, pool []seedEntry) (call, error) {
	switch op {
	case "status":
		return func(ctx context.Context, _ int64) string {
			resp, err := client.Status(ctx, &pb.StatusRequest{})
			if err != nil {
				return codeOf(err)
			}
			if resp.GetHealthz() != "ok" || resp.GetKeyId() == "" {
				return "UNHEALTHY"
			}
			return ""
		}, nil
	case "encrypt":
		return func(ctx context.Context, _ int64) string {
			resp, err := client.Encrypt(ctx, &pb.EncryptRequest{Plaintext: newSeed(), Uid: uuid.NewString()})
			if err != nil {
				return codeOf(err)
			}
			if len(resp.GetCiphertext()) == 0 || len(resp.GetCiphertext()) > 1024 || resp.GetKeyId() == "" {
				return "BAD_RESPONSE"
			}
			return ""
		}, nil
	case "decrypt":
		if len(pool) == 0 {
			return nil, errors.New("decrypt needs -pool-file with at least one entry")
		}
		return func(ctx context.Context, i int64) string {
			e := &pool[i%int64(len(pool))]
			resp, err := client.Decrypt(ctx, &pb.DecryptRequest{Ciphertext: e.Ciphertext, Uid: uuid.NewString(),
				KeyId: e.KeyID, Annotations: e.Annotations})
			if err != nil {
				return codeOf(err)
			}
			if !bytes.Equal(resp.GetPlaintext(), e.Seed) {
				return "MISMATCH"
			}
			return ""
		}, nil
	}
	return nil, fmt.Errorf("unknown -op %q (status, encrypt, decrypt)", op)
}

type loadResult struct {
	Op                string         `json:"op"`
	Concurrency       int            `json:"concurrency"`
	Connections       int            `json:"connections"`
	Calls             int            `json:"calls"`
	OK                int            `json:"ok"`
	Errors            int            `json:"errors"`
	ErrorCodes        map[string]int `json:"error_codes"`
	Seconds           float64        `json:"seconds"`
	Throughput        float64        `json:"throughput"`
	MeanMs            float64        `json:"mean_ms"`
	P50Ms             float64        `json:"p50_ms"`
	P90Ms             float64        `json:"p90_ms"`
	P99Ms             float64        `json:"p99_ms"`
	MaxMs             float64        `json:"max_ms"`
	LoadgenCPUSeconds float64        `json:"loadgen_cpu_seconds"`
	StartUnix         float64        `json:"start_unix"`
	EndUnix           float64        `json:"end_unix"`
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	idx := int(p*float64(len(sorted))+0.999999) - 1 // nearest rank
	if idx < 0 {
		idx = 0
	}
	if idx >= len(sorted) {
		idx = len(sorted) - 1
	}
	return sorted[idx]
}

func loadPool(path string) ([]seedEntry, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var pool []seedEntry
	scanner := bufio.NewScanner(f)
	scanner.Buffer(make([]byte, 1<<20), 1<<20)
	for scanner.Scan() {
		var e seedEntry
		if err := json.Unmarshal(scanner.Bytes(), &e); err != nil {
			return nil, err
		}
		pool = append(pool, e)
	}
	return pool, scanner.Err()
}

func runLoad(args []string) error {
	fs := flag.NewFlagSet("load", flag.ExitOnError)
	target := fs.String("target", "", "plugin endpoint, unix:///path/to.sock")
	op := fs.String("op", "status", "status, encrypt or decrypt")
	concurrency := fs.Int("c", 1, "calls in flight (closed loop: each worker sends its next call when the last returns)")
	conns := fs.Int("conns", 1, "gRPC connections (kube-apiserver uses one per provider)")
	duration := fs.Duration("duration", 10*time.Second, "measured time (after -warmup); ignored with -count")
	warmup := fs.Duration("warmup", 2*time.Second, "time under load before measuring; ignored with -count")
	count := fs.Int("count", 0, "send exactly this many calls (no warm-up) instead of running for -duration")
	poolFile := fs.String("pool-file", "", "seeds written by `pool` (needed for -op decrypt)")
	timeout := fs.Duration("timeout", 3*time.Second, "per-call deadline (kube-apiserver's default KMS timeout)")
	_ = fs.Parse(args)
	if *target == "" || *concurrency < 1 || *conns < 1 {
		return errors.New("load needs -target, -c >= 1, -conns >= 1")
	}
	pool, err := loadPool(*poolFile)
	if err != nil {
		return fmt.Errorf("reading -pool-file: %w", err)
	}
	clients := make([]pb.KeyManagementServiceClient, *conns)
	for i := range clients {
		conn, err := dial(*target)
		if err != nil {
			return err
		}
		defer conn.Close()
		clients[i] = pb.NewKeyManagementServiceClient(conn)
		// Connect before measuring, as a long-running apiserver would be, without sending a call (a
		// Status here would show up in the backend request counts of plugins that call their backend).
		if err := waitConnected(conn, 10*time.Second); err != nil {
			return err
		}
	}
	calls := make([]call, *conns)
	for i, client := range clients {
		if calls[i], err = makeCall(*op, client, pool); err != nil {
			return err
		}
	}

	type workerStats struct {
		lat  []time.Duration
		errs map[string]int
	}
	stats := make([]workerStats, *concurrency)
	var next atomic.Int64
	var wg sync.WaitGroup
	begin := time.Now()
	warmEnd, end := begin.Add(*warmup), begin.Add(*warmup+*duration)
	if *count > 0 {
		warmEnd, end = begin, time.Time{}
	}
	cpu0 := cpuSeconds()
	for w := 0; w < *concurrency; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			st := &stats[w]
			st.errs = map[string]int{}
			do := calls[w%len(calls)]
			for {
				i := next.Add(1) - 1
				if *count > 0 && i >= int64(*count) {
					return
				}
				t0 := time.Now()
				if *count == 0 && !t0.Before(end) {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), *timeout)
				label := do(ctx, i)
				cancel()
				if t0.Before(warmEnd) {
					continue
				}
				st.lat = append(st.lat, time.Since(t0))
				if label != "" {
					st.errs[label]++
				}
			}
		}(w)
	}
	wg.Wait()
	finished := time.Now()
	cpu := cpuSeconds() - cpu0
	window := finished.Sub(warmEnd)
	if *count == 0 {
		window = end.Sub(warmEnd)
	}

	res := loadResult{Op: *op, Concurrency: *concurrency, Connections: *conns, ErrorCodes: map[string]int{},
		Seconds: window.Seconds(), LoadgenCPUSeconds: cpu,
		StartUnix: float64(warmEnd.UnixNano()) / 1e9, EndUnix: float64(finished.UnixNano()) / 1e9}
	var all []time.Duration
	var sum time.Duration
	for _, st := range stats {
		all = append(all, st.lat...)
		for k, v := range st.errs {
			res.ErrorCodes[k] += v
			res.Errors += v
		}
	}
	sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
	for _, d := range all {
		sum += d
	}
	res.Calls = len(all)
	res.OK = res.Calls - res.Errors
	if res.Calls > 0 {
		res.MeanMs = ms(sum) / float64(res.Calls)
		res.P50Ms, res.P90Ms = ms(percentile(all, 0.50)), ms(percentile(all, 0.90))
		res.P99Ms, res.MaxMs = ms(percentile(all, 0.99)), ms(all[len(all)-1])
	}
	if res.Seconds > 0 {
		res.Throughput = float64(res.OK) / res.Seconds
	}
	return printJSON(res)
}

func runPool(args []string) error {
	fs := flag.NewFlagSet("pool", flag.ExitOnError)
	target := fs.String("target", "", "plugin endpoint, unix:///path/to.sock")
	n := fs.Int("n", 256, "seeds to wrap")
	concurrency := fs.Int("c", 8, "calls in flight")
	out := fs.String("out", "", "output file (JSON lines)")
	_ = fs.Parse(args)
	if *target == "" || *out == "" {
		return errors.New("pool needs -target and -out")
	}
	conn, err := dial(*target)
	if err != nil {
		return err
	}
	defer conn.Close()
	client := pb.NewKeyManagementServiceClient(conn)
	pool := make([]seedEntry, *n)
	errs := make([]error, *n)
	begin := time.Now()
	forEach(*n, *concurrency, func(i int) {
		seed := newSeed()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := client.Encrypt(ctx, &pb.EncryptRequest{Plaintext: seed, Uid: uuid.NewString()})
		cancel()
		if err != nil {
			errs[i] = err
			return
		}
		pool[i] = seedEntry{Seed: seed, Ciphertext: resp.GetCiphertext(), KeyID: resp.GetKeyId(),
			Annotations: resp.GetAnnotations()}
	})
	for _, err := range errs {
		if err != nil {
			return fmt.Errorf("Encrypt failed while building the pool: %w", err)
		}
	}
	f, err := os.OpenFile(*out, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	for _, e := range pool {
		line, _ := json.Marshal(e)
		w.Write(line)
		w.WriteByte('\n')
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return printJSON(map[string]any{"n": *n, "seconds": time.Since(begin).Seconds()})
}

// forEach calls work(i) for every i in [0, n), from `concurrency` goroutines, and returns when all are done.
func forEach(n, concurrency int, work func(i int)) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				work(i)
			}
		}()
	}
	wg.Wait()
}
