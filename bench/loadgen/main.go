// Command kleidi-bench is the Go side of kleidi's benchmark harness (bench/): it drives a KMS v2
// plugin over its unix socket the way kube-apiserver does, serves a no-op KMS v2 plugin (the
// generator's ceiling), serves a Go reference plugin on Vault/OpenBao Transit, and creates and
// lists Secrets through a kube-apiserver. Every subcommand prints one JSON document on stdout.
package main

import (
	"encoding/json"
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	args := os.Args[2:]
	var err error
	switch os.Args[1] {
	case "load":
		err = runLoad(args)
	case "pool":
		err = runPool(args)
	case "noop":
		err = runNoop(args)
	case "transit-ref":
		err = runTransitRef(args)
	case "secrets-create":
		err = runSecretsCreate(args)
	case "secrets-list":
		err = runSecretsList(args)
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kleidi-bench:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, `usage: kleidi-bench COMMAND [flags]   (COMMAND -h for its flags)
  load            drive Status, Encrypt or Decrypt against a KMS v2 socket for a duration or a count
  pool            Encrypt N random seeds and write them (with ciphertext, key_id, annotations) to a file
  noop            serve a KMS v2 plugin that does nothing (the load generator's ceiling)
  transit-ref     serve a Go KMS v2 plugin on Vault/OpenBao Transit with vault-kubernetes-kms v1.4.0's per-call traffic
  secrets-create  create N Secrets through a kube-apiserver
  secrets-list    list every Secret in a namespace once (one unpaginated LIST)`)
	os.Exit(2)
}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
