#!/usr/bin/env bash
# Hook of the demo sandbox (run last by provisioning, as root, inside the
# container): a small web app on the app port, 8000, run by systemd so it
# survives restarts. Node.js comes with the golden image.
set -euo pipefail
mkdir -p /srv/demo-app
cat >/srv/demo-app/server.js <<'JS'
const http = require('http');
const os = require('os');
http.createServer((req, res) => {
  res.setHeader('content-type', 'text/plain');
  res.end(`hello from the demo sandbox ${os.hostname()} (${req.headers.host})\n`);
}).listen(8000);
JS
cat >/etc/systemd/system/demo-app.service <<'UNIT'
[Unit]
Description=sandboxd demo app on port 8000
After=network.target

[Service]
ExecStart=/usr/bin/node /srv/demo-app/server.js
DynamicUser=yes
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload
systemctl enable --now demo-app.service
echo "demo app on port 8000"
