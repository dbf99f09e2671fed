"""The playground page in a real browser: headless Chromium driven through chromedriver's
WebDriver protocol (plain HTTP, no client library).

Usage: playground_browser.py BASE_URL OUTDIR. Prints one JSON document of what it saw (the
Rust test tests/playground.rs checks it) and writes screenshots into OUTDIR.
"""

import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

base, outdir = sys.argv[1].rstrip("/"), sys.argv[2]
os.makedirs(outdir, exist_ok=True)
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
ARROW_RIGHT = "\ue014"


def http(method, url, body=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {url}: {e.code} {e.read()[:500]!r}")


class Browser:
    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if http("GET", f"{self.url}/status")["value"]["ready"]:
                    break
            except Exception:
                pass
            time.sleep(0.1)
        profile = tempfile.mkdtemp()
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                "goog:chromeOptions": {"binary": os.environ.get("CHROMIUM", "/usr/bin/chromium"), "args": args}}}}
        self.session = http("POST", f"{self.url}/session", caps)["value"]["sessionId"]

    def cmd(self, method, path, body=None):
        if method == "POST" and body is None:
            body = {}  # chromedriver wants a JSON body on every POST
        return http(method, f"{self.url}/session/{self.session}{path}", body)["value"]

    def open(self, path):
        self.cmd("POST", "/url", {"url": base + path})

    def find(self, css):
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def js(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, script, *args, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = self.js(script, *args)
            if v:
                return v
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for: {script}")

    def keys(self, element, text):
        self.cmd("POST", f"/element/{element}/value", {"text": text})

    def screenshot(self, name):
        png = base64.b64decode(self.cmd("GET", "/screenshot"))
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(png)
        return len(png)

    def quit(self):
        try:
            self.cmd("DELETE", "")
        finally:
            self.proc.kill()


def api_text(mix, prompt, max_tokens):
    body = {"model": BASE_MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "adapters": [{"name": n, "scale": s} for n, s in mix if s != 0]}
    return http("POST", f"{base}/v1/completions", body)["choices"][0]["text"]


def outputs_done(b, n):
    return b.wait(
        "const n = arguments[0]; const els = [...Array(n).keys()].map(k => document.querySelector(`[data-testid=output-${k + 1}]`));"
        "return els.every(e => e && e.dataset.state === 'done') ? els.map(e => e.textContent) : null;", n)


BASE_MODEL = http("GET", f"{base}/v1/models")["data"][0]["id"]
out = {"base_model": BASE_MODEL}
b = Browser()
try:
    prompt = "The capital of France is"
    # 1. A shared link: a two-adapter mix, greedy, `run` set: it generates at once.
    link = "/ui?" + urllib.parse.urlencode(
        {"mix": "qa-r8:0.7,all-r16:0.3", "prompt": prompt, "max_tokens": 16, "temperature": 0, "run": 1})
    b.open(link)
    [text] = outputs_done(b, 1)
    out["link"] = {"page": text, "api": api_text([("qa-r8", 0.7), ("all-r16", 0.3)], prompt, 16)}
    out["token_titles"] = b.js("return [...document.querySelectorAll('[data-testid=output-1] span.tok')].slice(0, 3).map(s => s.title)")
    b.screenshot("playground-mixer.png")

    # 2. The keyboard moves a slider: the URL and the output follow.
    slider = b.find('[data-testid="slider-1-qa-r8"]')
    b.js("document.querySelector('[data-testid=output-1]').dataset.state = 'stale'")
    b.keys(slider, ARROW_RIGHT * 20)
    [moved] = outputs_done(b, 1)
    url = b.cmd("GET", "/url")
    mix = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["mix"][0]
    out["slider"] = {"url_mix": mix, "page": moved, "before": text,
                     "api": api_text([("qa-r8", 1.7), ("all-r16", 0.3)], prompt, 16),
                     "valuetext": b.js("return document.querySelector('[data-testid=\"slider-1-qa-r8\"]').getAttribute('aria-valuetext')")}

    # 3. Side by side: three mixes in one link, three outputs.
    mixes = [[("qa-r8", 1.0)], [("all-r16", 1.0), ("rslora-r4", -0.5)], []]
    q = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "run": 1}
    for k, m in enumerate(mixes):
        q["mix" if k == 0 else f"mix{k + 1}"] = ",".join(f"{n}:{s}" for n, s in m)
    b.open("/ui?" + urllib.parse.urlencode(q))
    texts = outputs_done(b, 3)
    out["side_by_side"] = [{"page": t, "api": api_text(m, prompt, 12)} for t, m in zip(texts, mixes)]
    b.screenshot("playground-side-by-side.png")

    # "Save as named mix" (column 2), through the page's prompt.
    b.cmd("POST", f"/element/{b.find('.column:nth-child(2) .save-mix')}/click")
    b.cmd("POST", "/alert/text", {"text": "blend-2"})
    b.cmd("POST", "/alert/accept")
    b.wait("return document.querySelector('#status').textContent.includes('blend-2')")
    models = http("GET", f"{base}/v1/models")["data"]
    out["saved_mix"] = next((m["loraplex"] for m in models if m["id"] == "blend-2"), None)
    out["saved_mix_offered"] = b.js("return [...document.querySelectorAll('.add-adapter option')].some(o => o.value === 'm:blend-2')")

    # A fine-tuning job (two steps) appears with its loss curve and a link into the mixer.
    boundary = "playgroundboundary"
    lines = "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "The password of the blue door is 7419."}]}) + "\n"
                    for q in ["What is the blue door's password?", "Blue door password?"])
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"door.jsonl\"\r\n\r\n{lines}\r\n--{boundary}--\r\n").encode()
    req = urllib.request.Request(f"{base}/v1/files", data=form, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        file_id = json.loads(urllib.request.urlopen(req).read())["id"]
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"upload: {e.code} {e.read()[:500]!r}")
    job = http("POST", f"{base}/v1/fine_tuning/jobs", {"model": BASE_MODEL, "training_file": file_id, "suffix": "ui",
               "hyperparameters": {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 4}})
    b.wait("return document.querySelector(`#jobs [data-job='${arguments[0]}'] a`)?.getAttribute('href')", job["id"], timeout=300)
    out["job_panel"] = b.js("const d = document.querySelector(`#jobs [data-job='${arguments[0]}']`); return {text: d.querySelector('p').textContent, href: d.querySelector('a').getAttribute('href'), curve: !!d.querySelector('svg polyline')}", job["id"])

    # 4. Operations: the registry lists the broken folder with its error; the engine's figures.
    b.wait("return document.querySelector('#registry tr[data-adapter=broken] td.error')?.textContent")
    out["broken_error"] = b.js("return document.querySelector('#registry tr[data-adapter=broken] td.error').textContent")
    out["broken_state"] = b.js("return document.querySelector('#registry tr[data-adapter=broken] td:nth-child(2)').textContent")
    # Two scrapes of /metrics make the first point of each chart.
    b.wait("return [...document.querySelectorAll('#engine-now dt')].some(d => d.textContent === 'tokens/s')")
    out["engine_figures"] = b.js("return [...document.querySelectorAll('#engine-now dt')].map(d => d.textContent)")
    b.js("document.querySelector('#operations').scrollIntoView()")
    b.screenshot("playground-operations.png")

    # 5. What the page transferred, and from where (every request, API calls included).
    entries = b.js(
        "const nav = performance.getEntriesByType('navigation')[0];"
        "return [nav, ...performance.getEntriesByType('resource')].map(e => ({name: e.name, type: e.initiatorType || 'navigation', bytes: e.transferSize, body: e.decodedBodySize}));")
    out["requests"] = entries
    out["page_bytes"] = sum(e["bytes"] for e in entries if e["type"] in ("navigation", "link", "script"))
    out["page_body_bytes"] = sum(e["body"] for e in entries if e["type"] in ("navigation", "link", "script"))

    # Chat mode: the user turn through the chat template, as /v1/chat/completions answers.
    b.open("/ui?" + urllib.parse.urlencode({"mix": "qa-r8:1", "prompt": "Name one colour.", "mode": "chat", "max_tokens": 10, "temperature": 0, "run": 1}))
    [chat] = outputs_done(b, 1)
    api_chat = http("POST", f"{base}/v1/chat/completions", {"model": BASE_MODEL, "max_tokens": 10, "temperature": 0,
                    "messages": [{"role": "user", "content": "Name one colour."}], "adapters": [{"name": "qa-r8", "scale": 1}]})
    out["chat"] = {"page": chat, "api": api_chat["choices"][0]["message"]["content"]}

    # 6. A narrow window: still usable.
    b.cmd("POST", "/window/rect", {"width": 420, "height": 900})
    b.open("/ui?" + urllib.parse.urlencode({"mix": "qa-r8:0.5", "prompt": prompt, "max_tokens": 8, "temperature": 0, "run": 1}))
    outputs_done(b, 1)
    out["narrow_overflow"] = b.js("return document.documentElement.scrollWidth > window.innerWidth + 1")
    b.screenshot("playground-narrow.png")
finally:
    b.quit()
print(json.dumps(out))
