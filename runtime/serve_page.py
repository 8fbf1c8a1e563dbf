"""The page at `/` for people: pick a class, a seed and steps, watch the previews stream in."""

from __future__ import annotations

import html
import json

from .pipeline import Pipeline

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>MaskBit</title>
<style>body{font-family:sans-serif;margin:2em;max-width:46em} img{image-rendering:pixelated;width:256px;
border:1px solid #ccc} label{margin-right:1em}</style></head>
<body><h1>MaskBit: __NAME__</h1>
<p><label>class <select id="label">__OPTIONS__</select></label>
<label>seed <input id="seed" type="number" value="0" min="0" style="width:6em"></label>
<label>steps <input id="steps" type="number" value="__STEPS__" min="1" style="width:5em"></label>
<button id="go">generate</button></p>
<p id="status"></p><img id="out" alt="">
<p><a href="/docs">API (OpenAPI)</a> &middot; <a href="/v1/models">/v1/models</a> &middot;
<a href="/metrics">/metrics</a></p>
<script>
const $ = id => document.getElementById(id);
$("go").onclick = async () => {
  const steps = +$("steps").value;
  const body = {labels: [$("label").value], seed: +$("seed").value, num_steps: steps, stream: true,
                preview_every: Math.max(1, Math.ceil(steps / 16))};
  const r = await fetch("/v1/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify(body)});
  if (!r.ok) { $("status").textContent = (await r.json()).error; return; }
  const reader = r.body.getReader(), dec = new TextDecoder(); let buf = "";
  for (;;) {
    const {done, value} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true}); let i;
    while ((i = buf.indexOf("\\n\\n")) >= 0) {
      const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
      const kind = chunk.match(/^event: (.*)$/m)[1], data = JSON.parse(chunk.match(/^data: (.*)$/m)[1]);
      if (kind === "progress") $("status").textContent = `step ${data.steps[0]} / ${data.num_steps}`;
      if (kind === "preview") $("out").src = "data:image/png;base64," + data.png;
      if (kind === "result") { $("out").src = "data:image/png;base64," + data.images[0].png;
                               $("status").textContent = `done in ${data.computing_seconds} s`; }
      if (kind === "error") $("status").textContent = data.error;
    }
  }
};
</script></body></html>
"""


def page_html(pipeline: Pipeline) -> str:
    names = pipeline.class_names or [str(i) for i in range(pipeline.num_classes)]
    options = "".join(f'<option value="{i}">{html.escape(str(n))}</option>' for i, n in enumerate(names))
    return (_PAGE.replace("__NAME__", html.escape(pipeline.manifest.name or "bundle")).replace("__OPTIONS__", options)
            .replace("__STEPS__", json.dumps(pipeline.sampling.num_steps)))
