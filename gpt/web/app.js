// The page's only script: reads the controls, streams POST /v1/completions (server-sent events over fetch,
// since EventSource cannot POST), appends each chunk's text as it arrives and shows the speed.
"use strict";

const $ = (id) => document.getElementById(id);
let modelName = null;
let running = null;   // the AbortController of the request in flight

function unescape(text) {   // \n, \t, \\ as in the sampler's --stop
  return text.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
}

function request() {
  const body = {
    prompt: $("prompt").value,
    max_tokens: parseInt($("max-tokens").value, 10) || 16,
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top-p").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  if (modelName) body.model = modelName;
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  if ($("stop").value !== "") body.stop = unescape($("stop").value);
  return body;
}

function showStats(tokens, start, first, last) {
  $("tokens").textContent = tokens;
  $("ttft").textContent = first === null ? "-" : `${Math.round(first - start)} ms`;
  // Decoding speed: the tokens after the first over the time since it (the first includes the prompt).
  const speed = tokens > 1 && last > first ? (tokens - 1) / ((last - first) / 1000) : null;
  $("speed").textContent = speed === null ? "-" : speed.toFixed(1);
}

async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) yield data;
    }
  }
}

async function generate() {
  if (running) return;
  const body = request();
  $("error").textContent = "";
  $("prompt-echo").textContent = body.prompt;
  $("generated").textContent = "";
  $("finish").textContent = "generating...";
  $("generate").disabled = true;
  $("stop-button").disabled = false;
  running = new AbortController();
  const start = performance.now();
  let tokens = 0, first = null, last = null;
  showStats(0, start, null, null);
  try {
    const response = await fetch("/v1/completions", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify(body), signal: running.signal,
    });
    if (!response.ok) {
      const err = await response.json().catch(() => null);
      throw new Error(err && err.error ? err.error.message : `HTTP ${response.status}`);
    }
    for await (const data of serverSentEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices) {
        last = performance.now();
        if (first === null) first = last;
        tokens += 1;
        $("generated").append(choice.text);
        if (choice.finish_reason) $("finish").textContent = `finished: ${choice.finish_reason}`;
      }
      showStats(tokens, start, first, last);
    }
  } catch (e) {
    if (e.name === "AbortError") $("finish").textContent = "stopped";
    else { $("error").textContent = e.message; $("finish").textContent = "failed"; }
  } finally {
    running = null;
    $("generate").disabled = false;
    $("stop-button").disabled = true;
  }
}

function bindRange(id) {
  const show = () => { $(`${id}-value`).textContent = $(id).value; };
  $(id).addEventListener("input", show);
  show();
}

async function connect() {
  try {
    const models = await (await fetch("/v1/models")).json();
    modelName = models.data[0].id;
    const health = await (await fetch("/health")).json();
    $("model").textContent = `model ${modelName}`;
    $("status").textContent = `${health.slots} slots`;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

bindRange("temperature");
bindRange("top-p");
$("generate").addEventListener("click", generate);
$("stop-button").addEventListener("click", () => running && running.abort());
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) generate(); });
connect();
