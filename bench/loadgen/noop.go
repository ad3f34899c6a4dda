package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"google.golang.org/grpc"
	pb "k8s.io/kms/apis/v2"
)

// listenUnix binds a unix socket at path (an endpoint unix:///path is accepted too), replacing a
// stale socket file, with mode 0600.
func listenUnix(path string) (net.Listener, string, error) {
	path = strings.TrimPrefix(path, "unix://")
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, "", err
	}
	old := syscall.Umask(0o177)
	lis, err := net.Listen("unix", path)
	syscall.Umask(old)
	return lis, path, err
}

// serveUntilSignal serves until SIGTERM or SIGINT, then stops gracefully.
func serveUntilSignal(server *grpc.Server, lis net.Listener, name string) error {
	done := make(chan error, 1)
	go func() { done <- server.Serve(lis) }()
	fmt.Fprintf(os.Stderr, "%s serving on %s (pid %d)\n", name, lis.Addr(), os.Getpid())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-sig:
		server.GracefulStop()
		return nil
	case err := <-done:
		return err
	}
}

type noopPlugin struct {
	pb.UnimplementedKeyManagementServiceServer
}

var noopAnnotations = map[string][]byte{"noop.bench.kleidi.io": []byte("1")}

func (noopPlugin) Status(context.Context, *pb.StatusRequest) (*pb.StatusResponse, error) {
	return &pb.StatusResponse{Version: "v2", Healthz: "ok", KeyId: "noop-1"}, nil
}

// Encrypt returns the seed itself as the "ciphertext": no work at all, so that the load generator,
// gRPC and the socket are all that is measured.
func (noopPlugin) Encrypt(_ context.Context, r *pb.EncryptRequest) (*pb.EncryptResponse, error) {
	return &pb.EncryptResponse{Ciphertext: r.GetPlaintext(), KeyId: "noop-1", Annotations: noopAnnotations}, nil
}

func (noopPlugin) Decrypt(_ context.Context, r *pb.DecryptRequest) (*pb.DecryptResponse, error) {
	return &pb.DecryptResponse{Plaintext: r.GetCiphertext()}, nil
}

func runNoop(args []string) error {
	fs := flag.NewFlagSet("noop", flag.ExitOnError)
	socket := fs.String("socket", "", "unix socket path to serve on")
	_ = fs.Parse(args)
	if *socket == "" {
		return errors.New("noop needs -socket")
	}
	lis, _, err := listenUnix(*socket)
	if err != nil {
		return err
	}
	server := grpc.NewServer()
	pb.RegisterKeyManagementServiceServer(server, noopPlugin{})
	return serveUntilSignal(server, lis, "noop KMS v2 plugin")
}
