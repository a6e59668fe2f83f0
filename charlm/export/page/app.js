// charlm's step graph in the browser: onnxruntime-web runs model.onnx one symbol at a time.
//
// The decoding follows `charlm sample` (and generate.py): the prime through the network, then per
// step greedy or temperature -> a draw by inverse CDF, whose uniform numbers come from a port of
// Python's random.Random (Mersenne Twister, seeded as CPython seeds it from an integer), so a seed
// gives the text `charlm sample --seed` gives, up to float rounding. Written by `charlm export --web`.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;     // model.json: tokenizer, states, description
let session = null;   // ort.InferenceSession on the chosen backend
let backend = null;
let stopped = false;

// -- Python's random.Random(seed).random(), in JavaScript -------------------------------------
class PyRandom {
  constructor(seed) {
    this.mt = new Uint32Array(624);
    this.index = 624;
    let n = BigInt(seed);
    if (n < 0n) n = -n;
    const key = [];
    do { key.push(Number(n & 0xffffffffn)); n >>= 32n; } while (n > 0n);  // CPython: 32-bit words, least significant first
    this.initByArray(key);
  }
  initGenrand(s) {
    const mt = this.mt;
    mt[0] = s >>> 0;
    for (let i = 1; i < 624; i++) mt[i] = (Math.imul(1812433253, mt[i - 1] ^ (mt[i - 1] >>> 30)) + i) >>> 0;
    this.index = 624;
  }
  initByArray(key) {
    const mt = this.mt;
    this.initGenrand(19650218);
    let i = 1, j = 0;
    for (let k = Math.max(624, key.length); k > 0; k--) {
      mt[i] = ((mt[i] ^ Math.imul(mt[i - 1] ^ (mt[i - 1] >>> 30), 1664525)) + key[j] + j) >>> 0;
      i++; j++;
      if (i >= 624) { mt[0] = mt[623]; i = 1; }
      if (j >= key.length) j = 0;
    }
    for (let k = 623; k > 0; k--) {
      mt[i] = ((mt[i] ^ Math.imul(mt[i - 1] ^ (mt[i - 1] >>> 30), 1566083941)) - i) >>> 0;
      i++;
      if (i >= 624) { mt[0] = mt[623]; i = 1; }
    }
    mt[0] = 0x80000000;
  }
  uint32() {
    const mt = this.mt;
    if (this.index >= 624) {
      for (let k = 0; k < 624; k++) {
        const y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7fffffff);
        mt[k] = mt[(k + 397) % 624] ^ (y >>> 1) ^ (y & 1 ? 0x9908b0df : 0);
      }
      this.index = 0;
    }
    let y = mt[this.index++];
    y ^= y >>> 11;
    y = (y ^ ((y << 7) & 0x9d2c5680)) >>> 0;
    y = (y ^ ((y << 15) & 0xefc60000)) >>> 0;
    return (y ^ (y >>> 18)) >>> 0;
  }
  random() {  // 53 random bits in [0, 1), as random.random()
    const a = this.uint32() >>> 5, b = this.uint32() >>> 6;
    return (a * 67108864 + b) / 9007199254740992;
  }
}

// -- the vocabulary ---------------------------------------------------------------------------
function encoder(tok) {
  if (tok.kind === "spm") return null;  // SentencePiece has no encoder here: generation starts from the start ids
  const index = new Map();
  if (tok.kind === "char") tok.symbols.forEach((c, i) => index.set(c, i));
  else tok.bytes.forEach((b, i) => index.set(b, i));
  return (text) => {
    const units = tok.kind === "char" ? Array.from(text) : Array.from(new TextEncoder().encode(text));
    const missing = [...new Set(units.filter((u) => !index.has(u)))];
    if (missing.length) {
      const shown = missing.slice(0, 10).map((u) => tok.kind === "char" ? JSON.stringify(u) : "0x" + u.toString(16)).join(", ");
      throw new Error(`${missing.length} character(s) not in the model's vocabulary: ${shown}`);
    }
    return units.map((u) => index.get(u));
  };
}

function decoder(tok) {
  if (tok.kind === "char") return (id) => tok.symbols[id];
  const pieces = tok.kind === "bytes" ? tok.bytes.map((b) => new Uint8Array([b]))
    : tok.pieces.map((h) => new Uint8Array(h.match(/../g) ? h.match(/../g).map((x) => parseInt(x, 16)) : []));
  const utf8 = new TextDecoder("utf-8");  // replacement characters for bad bytes, as charlm's errors="replace"
  return (id) => utf8.decode(pieces[id], { stream: true });
}

// -- one step and the choice of the next symbol -----------------------------------------------
function zeroState(batch) {
  const state = {};
  for (const s of model.states) state[s.input] = new ort.Tensor("float32", new Float32Array(s.layers * batch * s.size), [s.layers, batch, s.size]);
  return state;
}

async function step(id, state) {
  const feeds = { ids: new ort.Tensor("int64", BigInt64Array.from([BigInt(id)]), [1]), ...state };
  const out = await session.run(feeds);
  const next = {};
  for (const s of model.states) next[s.input] = out[s.output];
  return [out.logprobs.data, next];
}

function argmax(x) {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

// charlm's draw: softmax (float32) -> cumulative sum in float64 -> the first symbol whose mass exceeds u * total.
function draw(logp, temperature, u) {
  const logits = new Float32Array(logp.length);
  for (let i = 0; i < logp.length; i++) logits[i] = temperature === 1 ? logp[i] : logp[i] / temperature;
  let top = -Infinity;
  for (const v of logits) top = Math.max(top, v);
  const e = new Float32Array(logits.length);
  let total = 0;
  for (let i = 0; i < logits.length; i++) { e[i] = Math.exp(logits[i] - top); total = Math.fround(total + e[i]); }
  const cdf = new Float64Array(logits.length);
  let run = 0;
  for (let i = 0; i < logits.length; i++) { run += Math.fround(e[i] / total); cdf[i] = run; }
  const target = u * cdf[cdf.length - 1];
  let lo = 0, hi = cdf.length;  // searchsorted(right): the first index whose value exceeds target
  while (lo < hi) { const mid = (lo + hi) >> 1; if (cdf[mid] <= target) lo = mid + 1; else hi = mid; }
  return Math.min(lo, logits.length - 1);
}

// -- the page ---------------------------------------------------------------------------------
function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function openSession(wanted) {
  if (backend === wanted && session) return;
  ort.env.wasm.wasmPaths = new URL(window.CHARLM_ORT_BASE, location.href).href;  // a bare "ort/" would be read as a module name
  ort.env.wasm.numThreads = 1;  // one stream of a small model: threads cost more than they give, and need cross-origin isolation
  session = await ort.InferenceSession.create("model.onnx", { executionProviders: [wanted], graphOptimizationLevel: "all" });
  backend = wanted;
}

async function generate() {
  const button = $("generate");
  button.disabled = true; $("stop").disabled = false; stopped = false;
  const out = $("output");
  out.textContent = "";
  try {
    await openSession($("backend").value);
    const length = Math.max(0, parseInt($("length").value, 10) || 0);
    const greedy = $("greedy").checked;
    const temperature = parseFloat($("temperature").value);
    if (!greedy && !(temperature > 0)) throw new Error("temperature must be > 0; for deterministic decoding tick Greedy");
    const seedText = $("seed").value.trim();
    if (seedText && !/^\d+$/.test(seedText)) throw new Error("the seed is a whole number >= 0 (or empty for a random one)");
    const seed = seedText ? BigInt(seedText) : BigInt(Math.floor(Math.random() * 2 ** 52));
    const rng = new PyRandom(seed);
    const prime = $("prime").value;
    const encode = encoder(model.tokenizer);
    if (prime && !encode) throw new Error("this model's SentencePiece tokenizer cannot encode a prime in the browser: leave the prime empty (or use generate.py)");
    let ids = prime ? encode(prime) : [];
    if (!ids.length) ids = model.tokenizer.start;
    const primeSpan = document.createElement("span");
    primeSpan.className = "prime"; primeSpan.textContent = prime;
    const textNode = document.createTextNode("");
    out.append(primeSpan, textNode);
    setStatus(`reading the prime (${ids.length} symbols)…`);
    let state = zeroState(1), logp = null;
    for (const id of ids) [logp, state] = await step(id, state);
    const decode = decoder(model.tokenizer);
    let text = "", chars = 0, last = performance.now();
    const started = performance.now();
    setStatus(`generating on ${backend}…`);
    for (let t = 0; t < length && !stopped; t++) {
      const next = greedy ? argmax(logp) : draw(logp, temperature, rng.random());
      const piece = decode(next);
      text += piece; chars += [...piece].length;
      if (t + 1 < length) [logp, state] = await step(next, state);
      if (performance.now() - last > 50) {  // let the page paint: the text streams in
        textNode.data = text; showSpeed(chars, started);
        await new Promise((r) => setTimeout(r, 0));
        last = performance.now();
      }
    }
    textNode.data = text;
    const rate = showSpeed(chars, started);
    out.dataset.generated = text;
    setStatus(`${stopped ? "stopped" : "done"}: ${chars} characters on ${backend}${greedy ? ", greedy" : `, seed ${seed}`}`);
    $("speed").dataset.charsPerS = rate.toFixed(1);
    document.body.dataset.state = "done";
  } catch (e) {
    setStatus(String(e.message || e), true);
    document.body.dataset.state = "error";
  } finally {
    button.disabled = false; $("stop").disabled = true;
  }
}

function showSpeed(chars, started) {
  const rate = chars / Math.max((performance.now() - started) / 1000, 1e-6);
  $("speed").textContent = `${rate.toFixed(0)} characters/s`;
  return rate;
}

async function main() {
  try {
    if (typeof ort === "undefined") throw new Error(`onnxruntime-web did not load from ${window.CHARLM_ORT_BASE}`);
    model = await (await fetch("model.json")).json();
    const kind = { char: "characters", bytes: "bytes", spm: "SentencePiece pieces" }[model.tokenizer.kind];
    $("about").textContent = `${model.description}, ${model.vocab_size} ${kind}, weights in ${model.dtype}; ` +
      `charlm ${model.charlm_version}, onnxruntime-web ${window.CHARLM_ORT_VERSION}.`;
    let adapter = null;  // WebGPU is offered only where the browser has an adapter, not merely the API
    try { adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null; } catch (e) { adapter = null; }
    if (!adapter) $("backend").querySelector("option[value=webgpu]").disabled = true;
    ort.env.logLevel = "error";  // onnxruntime's warnings (which nodes run on the CPU) are not the user's business
    if (model.tokenizer.kind === "spm") { $("prime").disabled = true; $("prime").placeholder = "SentencePiece model: no prime in the browser (generate.py takes one)"; }
    await openSession("wasm");
    setStatus("ready");
    $("generate").disabled = false;
    document.body.dataset.state = "ready";
  } catch (e) {
    setStatus(`cannot load the model: ${e.message || e}`, true);
    document.body.dataset.state = "error";
  }
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => { stopped = true; });
main();
