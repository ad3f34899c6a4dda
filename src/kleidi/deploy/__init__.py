"""What kleidi's deployment artifacts are made from: the static pod manifest, the systemd unit and the
Helm chart's values schema, rendered from kleidi's own settings so they never drift from them."""
