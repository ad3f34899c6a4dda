package main

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"sync/atomic"
	"time"
)

type kubeFlags struct {
	server, token, ca, namespace *string
}

func addKubeFlags(fs *flag.FlagSet) kubeFlags {
	return kubeFlags{
		server:    fs.String("server", "", "kube-apiserver URL, https://127.0.0.1:PORT"),
		token:     fs.String("token", "", "bearer token"),
		ca:        fs.String("ca", "", "CA file that signed the apiserver's serving certificate"),
		namespace: fs.String("namespace", "default", "namespace"),
	}
}

// client is an HTTP/2 client with one connection, as client-go uses against an apiserver.
func (k kubeFlags) client() (*http.Client, error) {
	if *k.server == "" || *k.token == "" || *k.ca == "" {
		return nil, errors.New("needs -server, -token and -ca")
	}
	pem, err := os.ReadFile(*k.ca)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, errors.New("no certificate in -ca")
	}
	transport := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: true,
		MaxIdleConnsPerHost: 100}
	return &http.Client{Transport: transport, Timeout: 120 * time.Second}, nil
}

func (k kubeFlags) request(method, path string, body []byte) (*http.Request, error) {
	req, err := http.NewRequest(method, *k.server+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+*k.token)
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	return req, nil
}

func runSecretsCreate(args []string) error {
	fs := flag.NewFlagSet("secrets-create", flag.ExitOnError)
	k := addKubeFlags(fs)
	n := fs.Int("n", 5000, "Secrets to create")
	concurrency := fs.Int("c", 16, "requests in flight")
	prefix := fs.String("prefix", "bench", "name prefix")
	size := fs.Int("size", 256, "random bytes of data per Secret")
	_ = fs.Parse(args)
	client, err := k.client()
	if err != nil {
		return err
	}
	path := fmt.Sprintf("/api/v1/namespaces/%s/secrets", *k.namespace)
	lat := make([]time.Duration, *n)
	var failed atomic.Int64
	var firstErr atomic.Value
	begin := time.Now()
	forEach(*n, *concurrency, func(i int) {
		data := make([]byte, *size)
		_, _ = rand.Read(data)
		body, _ := json.Marshal(map[string]any{"apiVersion": "v1", "kind": "Secret",
			"metadata": map[string]any{"name": fmt.Sprintf("%s-%06d", *prefix, i)},
			"data":     map[string]string{"value": base64.StdEncoding.EncodeToString(data)}})
		req, _ := k.request("POST", path, body)
		t0 := time.Now()
		resp, err := client.Do(req)
		if err == nil {
			msg, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusCreated {
				err = fmt.Errorf("HTTP %d: %.300s", resp.StatusCode, msg)
			}
		}
		lat[i] = time.Since(t0)
		if err != nil {
			failed.Add(1)
			firstErr.CompareAndSwap(nil, err.Error())
		}
	})
	seconds := time.Since(begin).Seconds()
	sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
	result := map[string]any{"n": *n, "errors": failed.Load(), "seconds": seconds,
		"per_second": float64(*n) / seconds, "p50_ms": ms(percentile(lat, 0.5)), "p99_ms": ms(percentile(lat, 0.99)),
		"max_ms": ms(lat[len(lat)-1]), "concurrency": *concurrency}
	if e := firstErr.Load(); e != nil {
		result["first_error"] = e
	}
	return printJSON(result)
}

func runSecretsList(args []string) error {
	fs := flag.NewFlagSet("secrets-list", flag.ExitOnError)
	k := addKubeFlags(fs)
	_ = fs.Parse(args)
	client, err := k.client()
	if err != nil {
		return err
	}
	req, err := k.request("GET", fmt.Sprintf("/api/v1/namespaces/%s/secrets", *k.namespace), nil)
	if err != nil {
		return err
	}
	begin := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	seconds := time.Since(begin).Seconds()
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("LIST: HTTP %d: %.500s", resp.StatusCode, body)
	}
	var list struct {
		Items []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return err
	}
	return printJSON(map[string]any{"items": len(list.Items), "seconds": seconds, "bytes": len(body)})
}
