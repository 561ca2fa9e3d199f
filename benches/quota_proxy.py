"""A proxy in front of moto (for benches/cloud_pacing.sh) that enforces an account quota on one API:
at most QUOTA accepted calls in any trailing second; the rest get AWS's
ThrottlingException. Logs every call of that API: time, accepted or throttled."""
import http.client, json, sys, threading, time
from collections import deque
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

listen, upstream, method, prefix, quota, log_path = sys.argv[1:7]
quota = float(quota)
lock = threading.Lock()
accepted = deque()
log = open(log_path, "w")

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def handle_one(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        if self.command == method and self.path.startswith(prefix):
            now = time.monotonic()
            with lock:
                while accepted and now - accepted[0] >= 1.0:
                    accepted.popleft()
                ok = len(accepted) < quota
                if ok:
                    accepted.append(now)
                log.write(f"{now:.4f} {'ok' if ok else 'throttled'}\n"); log.flush()
            if not ok:
                out = json.dumps({"message": "Rate exceeded"}).encode()
                self.send_response(400)
                self.send_header("x-amzn-ErrorType", "ThrottlingException")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers(); self.wfile.write(out); return
        c = http.client.HTTPConnection(upstream)
        hdrs = {k: v for k, v in self.headers.items()}
        c.request(self.command, self.path, body=body, headers=hdrs)
        r = c.getresponse(); data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers(); self.wfile.write(data)
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_one

host, port = listen.split(":")
ThreadingHTTPServer((host, int(port)), H).serve_forever()
