#!/usr/bin/env python3
# What idle and slow clients can hold of a dm-server HTTPS port (its defaults).
# Usage: python3 benches/api_limits.py PATH/TO/dm-server   (run it against two revisions to compare)
import socket, ssl, subprocess, sys, time, os, tempfile, select
exe = sys.argv[1]
d = tempfile.mkdtemp()
srv = subprocess.Popen([exe, "--data", d + "/s", "--listen", "127.0.0.1:0", "--no-builtin-proxy"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    for _ in range(200):
        if os.path.exists(d + "/s/server.url"): break
        time.sleep(0.05)
    url = open(d + "/s/server.url").read().strip()
    host, port = url[len("https://"):].rsplit(":", 1); port = int(port)
    token = open(d + "/s/admin.token").read().strip()
    socks = [socket.create_connection((host, port)) for _ in range(200)]
    time.sleep(0.5)
    def closed(s):
        r, _, _ = select.select([s], [], [], 0)
        if not r: return False
        try: return s.recv(1) == b""
        except OSError: return True
    shut = sum(closed(s) for s in socks)
    print(f"200 idle TCP connections from one address: {shut} closed at once, {200-shut} held")
    t0 = time.time(); open_ = [s for s in socks if not closed(s)]
    while open_ and time.time() - t0 < 40:
        time.sleep(0.1); open_ = [s for s in open_ if not closed(s)]
    print(f"the held ones closed after {time.time()-t0:.1f} s (handshake deadline)")
    ctx = ssl.create_default_context(cafile=d + "/s/ca/ca.pem")
    def tls():
        t = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname="127.0.0.1")
        t.settimeout(45)
        return t
    s = tls(); t0 = time.time()
    s.sendall(f"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\ncontent-type: application/json\r\nContent-Length: 1073741824\r\n\r\n".encode())
    try: a = s.recv(100).decode(errors="replace").split("\r\n")[0]
    except Exception as e: a = repr(e)
    print(f"declared 1 GiB body: '{a}' after {1000*(time.time()-t0):.1f} ms")
    s = tls(); t0 = time.time(); s.settimeout(45)
    s.sendall(f"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\ncontent-type: application/json\r\nContent-Length: 100\r\n\r\n{{".encode())
    try: a = s.recv(100).decode(errors="replace").split("\r\n")[0]
    except Exception as e: a = repr(e)
    print(f"body promised, never sent: '{a}' after {time.time()-t0:.1f} s")
    s = tls(); t0 = time.time()
    s.settimeout(45)
    try: b = s.recv(1)
    except Exception as e: b = repr(e)
    print(f"TLS done, no request: closed after {time.time()-t0:.1f} s ({b!r})")
finally:
    srv.kill()
