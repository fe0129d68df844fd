# Thin aliases of the README commands (`just --list` shows them). Arguments pass through,
# e.g. `just test --quick --test auth`.

set positional-arguments

# List the recipes.
default:
    @just --list

# Run the gateway locally: private Postgres + Redis in .nz-dev/, the Ollama simulator.
dev *args:
    ./scripts/run "$@"

# Stop the dev Postgres, Redis and simulator started by `just dev` (data is kept).
stop:
    ./scripts/run stop

# Every check and test, as CI runs them (`--quick` skips fmt, clippy and cargo deny).
test *args:
    ./scripts/test "$@"

# Formatting check and clippy with warnings as errors.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Type-check everything (clippy with warnings as errors).
typecheck:
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Apply pending migrations to DATABASE_URL (`source .nz-dev/env` first for the dev stores).
migrate:
    cargo run --locked -- migrate

# Format the code.
fmt:
    cargo fmt --all
