package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	vault "github.com/hashicorp/vault/api"
	"google.golang.org/grpc"
	pb "k8s.io/kms/apis/v2"
)

// transitRef is a Go KMS v2 plugin on Vault/OpenBao Transit that makes, call for call, the Vault
// requests vault-kubernetes-kms v1.4.0 makes (see shared/docs/peers.md), through the same client
// library (github.com/hashicorp/vault/api, default pooled transport, 10 s timeout) and with one
// JSON log line per request, as that plugin logs:
//
//	Encrypt: POST <mount>/encrypt/<key>, then GET <mount>/keys/<key> (the key_id is re-read)  = 2
//	Decrypt: POST <mount>/decrypt/<key>                                                        = 1
//	Status:  GET <mount>/keys/<key>, then an Encrypt (2) and a Decrypt (1) as its health check = 4
//	every -token-refresh-interval: GET auth/token/lookup-self
//
// It stands in for vault-kubernetes-kms when that module cannot be installed (bench/README.md).
type transitRef struct {
	pb.UnimplementedKeyManagementServiceServer
	client *vault.Client
	mount  string
	key    string
	log    *slog.Logger
}

func (t *transitRef) keyID(ctx context.Context) (string, error) {
	secret, err := t.client.Logical().ReadWithContext(ctx, t.mount+"/keys/"+t.key)
	if err != nil {
		return "", err
	}
	if secret == nil || secret.Data == nil {
		return "", fmt.Errorf("transit key %s/%s not found", t.mount, t.key)
	}
	v, ok := secret.Data["latest_version"].(json.Number)
	if !ok {
		return "", errors.New("transit key has no latest_version")
	}
	return v.String(), nil
}

func (t *transitRef) encrypt(ctx context.Context, plaintext []byte) ([]byte, string, error) {
	secret, err := t.client.Logical().WriteWithContext(ctx, t.mount+"/encrypt/"+t.key,
		map[string]any{"plaintext": base64.StdEncoding.EncodeToString(plaintext)})
	if err != nil {
		return nil, "", err
	}
	ciphertext, ok := secret.Data["ciphertext"].(string)
	if !ok {
		return nil, "", errors.New("invalid response")
	}
	keyID, err := t.keyID(ctx)
	if err != nil {
		return nil, "", err
	}
	return []byte(ciphertext), keyID, nil
}

func (t *transitRef) decrypt(ctx context.Context, ciphertext []byte) ([]byte, error) {
	secret, err := t.client.Logical().WriteWithContext(ctx, t.mount+"/decrypt/"+t.key,
		map[string]any{"ciphertext": string(ciphertext)})
	if err != nil {
		return nil, err
	}
	plaintext, ok := secret.Data["plaintext"].(string)
	if !ok {
		return nil, errors.New("invalid response")
	}
	return base64.StdEncoding.DecodeString(plaintext)
}

func (t *transitRef) Status(ctx context.Context, _ *pb.StatusRequest) (*pb.StatusResponse, error) {
	keyID, err := t.keyID(ctx)
	if err != nil {
		return nil, err
	}
	health := "ok"
	probe := []byte("health")
	if ciphertext, _, err := t.encrypt(ctx, probe); err != nil {
		health = "err"
	} else if plaintext, err := t.decrypt(ctx, ciphertext); err != nil || string(plaintext) != string(probe) {
		health = "err"
	}
	t.log.Info("health status", "key_id", keyID, "healthz", health, "version", "v2")
	return &pb.StatusResponse{Version: "v2", Healthz: health, KeyId: keyID}, nil
}

func (t *transitRef) Encrypt(ctx context.Context, r *pb.EncryptRequest) (*pb.EncryptResponse, error) {
	ciphertext, keyID, err := t.encrypt(ctx, r.GetPlaintext())
	if err != nil {
		return nil, err
	}
	t.log.Info("v2 encryption request", "request_id", r.GetUid())
	return &pb.EncryptResponse{Ciphertext: ciphertext, KeyId: keyID}, nil
}

func (t *transitRef) Decrypt(ctx context.Context, r *pb.DecryptRequest) (*pb.DecryptResponse, error) {
	plaintext, err := t.decrypt(ctx, r.GetCiphertext())
	if err != nil {
		return nil, err
	}
	t.log.Info("v2 decryption request", "request_id", r.GetUid())
	return &pb.DecryptResponse{Plaintext: plaintext}, nil
}

func runTransitRef(args []string) error {
	fs := flag.NewFlagSet("transit-ref", flag.ExitOnError)
	socket := fs.String("socket", "", "unix socket path to serve on")
	address := fs.String("vault-address", "", "Vault/OpenBao address, e.g. http://127.0.0.1:8200")
	tokenFile := fs.String("token-file", "", "file holding the Vault token")
	mount := fs.String("transit-mount", "transit", "Transit mount")
	key := fs.String("transit-key", "kms", "Transit key name")
	refresh := fs.Duration("token-refresh-interval", 60*time.Second, "how often to look the token up")
	_ = fs.Parse(args)
	if *socket == "" || *address == "" || *tokenFile == "" {
		return errors.New("transit-ref needs -socket, -vault-address and -token-file")
	}
	token, err := os.ReadFile(*tokenFile)
	if err != nil {
		return err
	}
	cfg := vault.DefaultConfig()
	cfg.Address = *address
	cfg.HttpClient.Timeout = 10 * time.Second
	client, err := vault.NewClient(cfg)
	if err != nil {
		return err
	}
	client.SetToken(strings.TrimSpace(string(token)))
	if _, err := client.Auth().Token().LookupSelf(); err != nil {
		return fmt.Errorf("failed to connect to vault: %w", err)
	}
	plugin := &transitRef{client: client, mount: strings.Trim(*mount, "/"), key: *key,
		log: slog.New(slog.NewJSONHandler(os.Stderr, nil))}
	go func() {
		for range time.Tick(*refresh) {
			if _, err := client.Auth().Token().LookupSelf(); err != nil {
				plugin.log.Error("token lookup failed", "error", err.Error())
			}
		}
	}()
	lis, _, err := listenUnix(*socket)
	if err != nil {
		return err
	}
	server := grpc.NewServer()
	pb.RegisterKeyManagementServiceServer(server, plugin)
	return serveUntilSignal(server, lis, "transit-ref KMS v2 plugin")
}
