// Command ferretdb runs FerretDB v1 (SQLite handler) on a loopback address for wasm-reclaim's CI.
//
// It is FerretDB's own embeddable package (github.com/FerretDB/FerretDB/ferretdb) behind a
// minimal main: `go install github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.2` builds a binary
// that panics at start ("Invalid build/version/version.txt"), because the module proxy's copy
// lacks the generated version file that FerretDB's release build writes. The embeddable package
// skips that check, and everything else is the same code.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen-addr", "127.0.0.1:27017", "TCP address to listen on")
	sqlite := flag.String("sqlite-url", "file:data/", "SQLite directory URL (must end with /)")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Handler:   "sqlite",
		SQLiteURL: *sqlite,
		Logger:    logger,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "ferretdb:", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fmt.Fprintln(os.Stderr, "ferretdb: listening on", f.MongoDBURI())
	if err := f.Run(ctx); err != nil && ctx.Err() == nil {
		fmt.Fprintln(os.Stderr, "ferretdb:", err)
		os.Exit(1)
	}
}
