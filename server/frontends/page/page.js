// speakd's browser page: text in over the WebSocket protocol (protocol/README.md), speech out through an
// AudioWorklet jitter buffer, captions that follow the word being heard.
//
// Every URL is relative to the page, so the page works under any path prefix behind a reverse proxy.
// The access token lives in sessionStorage and travels only as a WebSocket subprotocol
// (`speakd.auth.<token>`), never in a URL.
"use strict";

(() => {
  const PROTOCOL = "speakd.v1";
  const AUTH_PREFIX = "speakd.auth.";
  const TOKEN_KEY = "speakd.token";
  const TOKEN_CHARS = /^[A-Za-z0-9._~+-]+$/; // what the daemon accepts (and a subprotocol may carry)
  const RATES = [8000, 12000, 16000, 24000, 48000]; // sample rates the protocol offers
  const OPUS_RATE = 24000; // the model's own rate: the daemon resamples nothing for Opus
  const FRAME_MS = 20;
  const PREBUFFER_MS = 100;
  const RING_SECONDS = 10; // the worklet's ring
  const AHEAD_SECONDS = 6; // decode ahead of playback at most this much; the rest waits encoded
  const PAUSE_MS = 700; // speak-as-I-type: a typing pause this long sends the word being typed and a flush
  const BOUNDARY = /[\s.,;:!?)\]}"'\u2014\u2013-]/u; // a word is complete once one of these follows it
  const SENTENCE_END = /[.!?\n]["')\]]*\s*$/u;

  const $ = (id) => document.getElementById(id);
  const els = {
    text: $("text"),
    voice: $("voice"),
    speed: $("speed"),
    speedOut: $("speed-out"),
    format: $("format"),
    live: $("live"),
    speak: $("speak"),
    stop: $("stop"),
    token: $("token"),
    forget: $("forget-token"),
    status: $("status"),
    said: $("said"),
    word: $("word"),
    rest: $("rest"),
    ttfa: $("ttfa"),
    underruns: $("underruns"),
    codecNote: $("codec-note"),
    auth: $("auth"),
  };

  // --- what tests and measurements read: output tap, highlight log, stop clicks -------------------
  const tap = {
    enabled: false,
    sampleRate: 0,
    chunks: [], // {frame, samples: Float32Array}: every block the worklet output while enabled
    highlights: [], // {index, word, shown, start_ms, end_ms, heard_ms, played_ms, context}: each change
    stops: [], // {frame, context, highlights}: the output clock (and highlights so far) at Stop
    events: [], // {type, context, reason}: server messages other than audio, in order
    log(list, entry) {
      if (list.length >= 10000) list.splice(0, 1000); // a page left open for hours stays small
      list.push(entry);
    },
    enable() {
      this.enabled = true;
      this.chunks = [];
      if (audio) audio.node.port.postMessage({ type: "tap", on: true });
    },
    // Everything tapped as little-endian 16-bit PCM in base64, from output frame `from` on.
    pcmBase64(from = 0) {
      const parts = this.chunks.filter((c) => c.frame + c.samples.length > from);
      const total = parts.reduce((n, c) => n + c.samples.length, 0);
      const bytes = new Uint8Array(total * 2);
      const view = new DataView(bytes.buffer);
      let at = 0;
      for (const c of parts) {
        for (const x of c.samples) {
          view.setInt16(at, Math.max(-32768, Math.min(32767, Math.round(x * 32767))), true);
          at += 2;
        }
      }
      let binary = "";
      for (let i = 0; i < bytes.length; i += 0x8000) {
        binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
      }
      return { frame: parts.length ? parts[0].frame : from, pcm: btoa(binary) };
    },
    // The output frame of the last sample louder than `threshold`, or -1.
    lastLoudFrame(threshold = 1e-3) {
      for (let k = this.chunks.length - 1; k >= 0; k--) {
        const c = this.chunks[k];
        for (let i = c.samples.length - 1; i >= 0; i--) {
          if (Math.abs(c.samples[i]) > threshold) return c.frame + i;
        }
      }
      return -1;
    },
  };
  window.speakdTap = tap;

  // --- audio: one AudioContext and worklet for the page ------------------------------------------
  let audio = null; // {ctx, node}
  let audioReady = null;

  function ensureAudio() {
    if (audio && audio.ctx.state === "suspended") audio.ctx.resume(); // e.g. after the tab was hidden
    if (audioReady) return audioReady;
    // 48 kHz is what WebCodecs' Opus decoder gives in Chromium, so the common path needs no resampling;
    // the browser converts to the device's rate itself.
    const ctx = new AudioContext({ sampleRate: 48000, latencyHint: "interactive" });
    ctx.resume(); // inside the click or key press that got us here, so autoplay rules allow it
    audioReady = (async () => {
      await ctx.audioWorklet.addModule(new URL("page/player-worklet.js", document.baseURI).href);
      const node = new AudioWorkletNode(ctx, "speakd-player", {
        numberOfInputs: 0,
        numberOfOutputs: 1,
        outputChannelCount: [1],
        processorOptions: { prebufferMs: PREBUFFER_MS, capacitySeconds: RING_SECONDS },
      });
      node.connect(ctx.destination);
      node.port.onmessage = (event) => onWorklet(event.data);
      audio = { ctx, node };
      tap.sampleRate = ctx.sampleRate;
      if (tap.enabled) node.port.postMessage({ type: "tap", on: true });
      if (ctx.state !== "running") await ctx.resume();
      return audio;
    })();
    audioReady.catch(() => {
      audioReady = null;
    });
    return audioReady;
  }

  // Linear-interpolating resampler that keeps its phase across chunks. Used only when the decoder's
  // rate differs from the AudioContext's (Opus in browsers that decode at the stream's rate, PCM at a
  // rate the context does not run at); plenty for speech.
  class Resampler {
    constructor(inRate, outRate) {
      this.step = inRate / outRate;
      this.pos = 0; // next output position, in input samples from the start of the next chunk
      this.prev = 0; // the last input sample of the previous chunk (at position -1)
    }
    process(input) {
      if (this.step === 1 || input.length === 0) return input;
      const n = input.length;
      const count = Math.max(0, Math.ceil((n - 1 - this.pos) / this.step));
      const out = new Float32Array(count);
      for (let k = 0; k < count; k++) {
        const p = this.pos + k * this.step;
        const i = Math.floor(p);
        const a = i < 0 ? this.prev : input[i];
        out[k] = a + (input[i + 1] - a) * (p - i);
      }
      this.pos += count * this.step - n;
      this.prev = input[n - 1];
      return out;
    }
  }

  // --- the connection ------------------------------------------------------------------------------
  let ws = null;
  let wsOpen = null; // a promise of the open socket
  let wsToken = ""; // the token wsOpen was opened with
  const contexts = new Map(); // context id -> Utterance, until its `done`
  let current = null; // the utterance being played
  let nextId = 1;
  let gen = 0;

  function streamUrl() {
    const url = new URL("v1/stream", document.baseURI);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    url.search = "";
    url.hash = "";
    return url.href;
  }

  function token() {
    return els.token.value.trim();
  }

  function connect() {
    const secret = token();
    if (wsOpen && wsToken === secret) return wsOpen;
    if (ws) ws.close(); // the token changed; its contexts are stopped already (one utterance at a time)
    ws = null;
    wsToken = secret;
    if (secret && !TOKEN_CHARS.test(secret)) {
      wsOpen = null;
      return Promise.reject(new Error("The access token may hold only letters, digits and . _ ~ + -"));
    }
    const protocols = secret ? [PROTOCOL, AUTH_PREFIX + secret] : [PROTOCOL];
    const opening = new Promise((resolve, reject) => {
      const socket = new WebSocket(streamUrl(), protocols);
      socket.binaryType = "arraybuffer";
      let opened = false;
      socket.onopen = () => {
        opened = true;
        if (wsOpen === opening) ws = socket;
        resolve(socket);
      };
      socket.onmessage = (event) => onFrame(event.data);
      socket.onclose = async () => {
        if (ws === socket) ws = null;
        if (wsOpen === opening) wsOpen = null;
        if (!opened) {
          const [message, needsToken] = await whyRefused(secret);
          reject(Object.assign(new Error(message), { needsToken }));
          return;
        }
        for (const [id, u] of contexts) {
          if (u.socket === socket) {
            u.connectionLost();
            contexts.delete(id);
          }
        }
      };
    });
    wsOpen = opening;
    return opening;
  }

  // A browser does not show why an upgrade failed, so ask a door that needs the same credentials.
  async function whyRefused(secret) {
    try {
      const headers = secret ? { Authorization: "Bearer " + secret } : {};
      const response = await fetch(new URL("metrics", document.baseURI), { headers, cache: "no-store" });
      if (response.status === 401) {
        return secret
          ? ["The daemon refused this access token. Check it under “Access token”.", true]
          : ["This daemon needs an access token: enter it under “Access token”, then try again.", true];
      }
      if (response.status === 403) {
        return ["The daemon does not allow this page's origin (auth.allowed_origins).", false];
      }
      if (response.status === 503) {
        return ["The daemon is busy or still loading its model; try again shortly.", false];
      }
    } catch (err) {
      return ["Cannot reach the daemon: " + err.message, false];
    }
    return ["The connection to the daemon was refused.", false];
  }

  function send(msg) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(MessagePack.encode(msg));
  }

  function onFrame(data) {
    let msg;
    try {
      msg = MessagePack.decode(new Uint8Array(data));
    } catch (err) {
      showStatus("Unreadable message from the daemon: " + err.message, true);
      return;
    }
    if (msg.type !== "audio")
      tap.log(tap.events, { type: msg.type, context: msg.context, reason: msg.reason });
    const u = msg.context == null ? null : contexts.get(msg.context);
    if (msg.type === "error" && (!u || u.stopped)) {
      // unknown_context here is a cancel that crossed the context's `done`: nothing went wrong
      if (msg.code !== "unknown_context") showStatus(msg.message, true);
      return;
    }
    if (u) u.onMessage(msg);
  }

  // --- one utterance: a context on the wire, a stream in the worklet -------------------------------
  class Utterance {
    constructor(settings) {
      this.id = "page-" + nextId++;
      this.gen = ++gen;
      this.settings = settings;
      this.text = ""; // everything sent to the context
      this.cpStarts = []; // UTF-16 index of each code point of `text` (the server counts code points)
      this.words = []; // {word, start_ms, end_ms, start, end}: start/end as UTF-16 indices
      this.queue = []; // audio messages not yet decoded
      this.started = null;
      this.decoder = null;
      this.inDecoder = 0;
      this.trim = null; // decoded samples still to drop (pre_skip at the decoder's rate)
      this.resampler = null;
      this.posted = 0;
      this.played = 0;
      this.heardMs = -1;
      this.current = -1;
      this.done = null;
      this.ended = false; // `end` sent
      this.finishing = false;
      this.stopped = false;
      this.firstTextAt = null;
      this.firstPlayedAt = null;
      this.sinceSentenceEnd = false;
      contexts.set(this.id, this);
    }

    open() {
      const s = this.settings;
      this.socket = ws;
      audio.node.port.postMessage({ type: "begin", gen: this.gen });
      send({
        type: "start",
        context: this.id,
        voice: s.voice || null,
        speed: s.speed,
        codec: s.codec,
        sample_rate: this.streamRate(),
        frame_ms: FRAME_MS,
        words: true,
      });
    }

    // Opus at the model's rate (the decoder gives 48 kHz anyway); PCM at the context's rate where the
    // protocol offers it, so the common case needs no resampling in the page.
    streamRate() {
      if (this.settings.codec === "opus") return OPUS_RATE;
      return RATES.includes(audio.ctx.sampleRate) ? audio.ctx.sampleRate : OPUS_RATE;
    }

    sendText(text) {
      if (!text || this.ended || this.stopped) return;
      let unit = this.text.length;
      for (const ch of text) {
        this.cpStarts.push(unit);
        unit += ch.length;
      }
      this.text += text;
      if (this.firstTextAt === null) this.firstTextAt = performance.now();
      send({ type: "text", context: this.id, text });
      this.sinceSentenceEnd = !SENTENCE_END.test(this.text);
      renderCaptions(this);
    }

    flush() {
      if (this.ended || this.stopped || !this.sinceSentenceEnd) return;
      send({ type: "flush", context: this.id });
      this.sinceSentenceEnd = false;
    }

    end() {
      if (this.ended || this.stopped) return;
      this.ended = true;
      send({ type: "end", context: this.id });
    }

    // Stop at once: the worklet drops what it holds now; the server is told, but not waited for.
    stop() {
      if (this.stopped) return;
      this.stopped = true;
      this.queue = [];
      if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
      if (audio) {
        const frame = Math.round(audio.ctx.currentTime * audio.ctx.sampleRate);
        tap.log(tap.stops, { frame, context: this.id, highlights: tap.highlights.length });
        if (current === this) audio.node.port.postMessage({ type: "stop" });
      }
      if (this.done) contexts.delete(this.id);
      else send({ type: "cancel", context: this.id });
      if (current === this) current = null;
    }

    connectionLost() {
      if (this.stopped || this.done) return;
      this.done = { reason: "error" };
      showStatus("The connection to the daemon closed.", true);
      this.pump();
    }

    codePointToUnit(cp) {
      return cp < this.cpStarts.length ? this.cpStarts[cp] : this.text.length;
    }

    onMessage(msg) {
      switch (msg.type) {
        case "started":
          this.started = msg;
          if (msg.codec === "opus") this.makeDecoder();
          break;
        case "words":
          for (const w of msg.words) {
            this.words.push({
              word: w.word,
              start_ms: w.start_ms,
              end_ms: w.end_ms,
              start: this.codePointToUnit(w.char_start),
              end: this.codePointToUnit(w.char_end),
            });
          }
          break;
        case "audio":
          if (this.stopped) return;
          this.queue.push(msg);
          this.pump();
          break;
        case "done":
          this.done = msg;
          contexts.delete(this.id); // the last message of a context
          if (!this.stopped) this.pump();
          if (msg.reason === "error") showStatus("The daemon stopped this utterance.", true);
          break;
        case "error":
          showStatus(msg.message, true);
          if (!this.started) {
            // a refused start: no context, and no `done` will follow; let the worklet wind down
            contexts.delete(this.id);
            this.done = msg;
            audio.node.port.postMessage({ type: "end", gen: this.gen });
          }
          break;
      }
    }

    makeDecoder() {
      this.decoder = new AudioDecoder({
        output: (data) => this.onDecoded(data),
        error: (err) => showStatus("Opus decoding failed: " + err.message, true),
      });
      this.decoder.configure({ codec: "opus", sampleRate: this.started.sample_rate, numberOfChannels: 1 });
    }

    // Samples decoded or waiting in the decoder and not yet played, at the AudioContext's rate.
    ahead() {
      const rate = audio.ctx.sampleRate;
      const frame = this.started ? (this.started.frame_ms * rate) / 1000 : 0;
      return this.posted - this.played + this.inDecoder * frame;
    }

    // Decode only as far ahead of playback as the worklet's ring allows; then, once `done` has come
    // and everything is decoded, tell the worklet the stream is complete.
    pump() {
      if (this.stopped || !audio) return;
      const limit = AHEAD_SECONDS * audio.ctx.sampleRate;
      while (this.queue.length && this.ahead() < limit) this.feed(this.queue.shift());
      if (this.done && !this.queue.length && !this.finishing) {
        this.finishing = true;
        const flushed =
          this.decoder && this.decoder.state === "configured" ? this.decoder.flush() : Promise.resolve();
        flushed
          .catch(() => {})
          .then(() => {
            if (!this.stopped) audio.node.port.postMessage({ type: "end", gen: this.gen });
          });
      }
    }

    feed(msg) {
      if (this.started.codec === "opus") {
        this.inDecoder += 1;
        const timestamp = msg.seq * this.started.frame_ms * 1000;
        this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp, data: msg.data }));
        return;
      }
      const view = new DataView(msg.data.buffer, msg.data.byteOffset, msg.data.byteLength);
      const pcm = new Float32Array(msg.data.byteLength >> 1);
      for (let i = 0; i < pcm.length; i++) pcm[i] = view.getInt16(i * 2, true) / 32768;
      this.post(pcm, this.started.sample_rate);
    }

    onDecoded(data) {
      this.inDecoder = Math.max(0, this.inDecoder - 1);
      if (this.stopped) {
        data.close();
        return;
      }
      const pcm = new Float32Array(data.numberOfFrames);
      data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
      const rate = data.sampleRate; // 48000 in Chromium, whatever the stream's rate
      data.close();
      if (this.trim === null)
        this.trim = Math.round((this.started.pre_skip * rate) / this.started.sample_rate);
      const cut = Math.min(this.trim, pcm.length);
      this.trim -= cut;
      this.post(cut ? pcm.subarray(cut) : pcm, rate);
    }

    post(pcm, rate) {
      if (!this.resampler) this.resampler = new Resampler(rate, audio.ctx.sampleRate);
      let out = this.resampler.process(pcm);
      if (!out.length) return;
      if (out.byteOffset !== 0 || out.byteLength !== out.buffer.byteLength) out = out.slice();
      this.posted += out.length;
      audio.node.port.postMessage({ type: "push", gen: this.gen, samples: out }, [out.buffer]);
    }

    // The played position from the worklet: highlight the word being heard, show time to first audio.
    onStatus(msg) {
      const ctx = audio.ctx;
      this.played = msg.played;
      els.underruns.textContent = String(msg.underruns);
      if (msg.startedFrame >= 0 && this.firstPlayedAt === null && this.firstTextAt !== null) {
        this.firstPlayedAt = frameToPerf(msg.startedFrame, msg.frame);
        const ms = Math.max(0, Math.round(this.firstPlayedAt - this.firstTextAt));
        els.ttfa.textContent = ms + " ms";
        els.ttfa.dataset.ms = String(ms);
      }
      // What the listener hears now: the played position less the audio still on its way out.
      const pending = Math.max(0, msg.frame - outputFrame(msg.frame));
      const heard = msg.playing ? Math.max(0, msg.played - pending) : msg.played;
      this.heardMs = (heard / ctx.sampleRate) * 1000;
      this.highlight((msg.played / ctx.sampleRate) * 1000);
      this.pump();
    }

    highlight(playedMs) {
      const at = this.heardMs;
      let index = -1;
      for (let i = Math.max(0, this.current); i < this.words.length; i++) {
        const w = this.words[i];
        if (w.start_ms > at) break;
        if (at < w.end_ms) {
          index = i;
          break;
        }
      }
      if (index === this.current) return;
      this.current = index;
      renderCaptions(this);
      if (index >= 0) {
        const w = this.words[index];
        tap.log(tap.highlights, {
          index,
          word: w.word,
          shown: els.word.textContent,
          start_ms: w.start_ms,
          end_ms: w.end_ms,
          heard_ms: at,
          played_ms: playedMs,
          context: this.id,
        });
      }
    }
  }

  // The output clock: the frame the listener hears now, from the context's output timestamp when the
  // browser gives one, else the rendered frame less the reported output latency.
  function outputFrame(renderedFrame) {
    const ctx = audio.ctx;
    const stamp = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    if (stamp && stamp.contextTime > 0) {
      const now = stamp.contextTime + (performance.now() - stamp.performanceTime) / 1000;
      return Math.min(renderedFrame, Math.round(now * ctx.sampleRate));
    }
    return renderedFrame - Math.round((ctx.outputLatency || ctx.baseLatency || 0) * ctx.sampleRate);
  }

  function frameToPerf(frame, renderedFrame) {
    const ctx = audio.ctx;
    const stamp = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    if (stamp && stamp.contextTime > 0) {
      return stamp.performanceTime + (frame / ctx.sampleRate - stamp.contextTime) * 1000;
    }
    const latency = (ctx.outputLatency || ctx.baseLatency || 0) * 1000;
    return performance.now() - ((renderedFrame - frame) / ctx.sampleRate) * 1000 + latency;
  }

  function onWorklet(msg) {
    if (msg.type === "tap") {
      if (tap.enabled) tap.chunks.push({ frame: msg.frame, samples: msg.samples });
      return;
    }
    const u = current;
    if (!u || msg.gen !== u.gen) return;
    if (msg.type === "status") u.onStatus(msg);
    else if (msg.type === "drained") finish(u);
  }

  function finish(u) {
    if (current !== u) return;
    current = null;
    u.current = -1;
    u.heardMs = Infinity;
    renderCaptions(u);
    if (live.u === u) live.u = null;
    updateButtons();
    if (!els.status.classList.contains("error")) showStatus("Done.");
  }

  // --- captions --------------------------------------------------------------------------------------
  function renderCaptions(u) {
    if (u !== current && current !== null) return;
    const w = u.current >= 0 ? u.words[u.current] : null;
    if (w) {
      els.said.textContent = u.text.slice(0, w.start);
      els.word.textContent = u.text.slice(w.start, w.end);
      els.rest.textContent = u.text.slice(w.end);
    } else {
      // between words, or no word timings: mark what has been heard, if we know
      let heardTo = 0;
      for (const x of u.words) if (x.end_ms <= u.heardMs) heardTo = x.end;
      els.said.textContent = u.text.slice(0, heardTo);
      els.word.textContent = "";
      els.rest.textContent = u.text.slice(heardTo);
    }
  }

  // --- controls --------------------------------------------------------------------------------------
  function showStatus(text, error = false) {
    els.status.textContent = text;
    els.status.classList.toggle("error", error);
  }

  function updateButtons() {
    els.stop.disabled = current === null;
  }

  function settings() {
    return { voice: els.voice.value, speed: Number(els.speed.value), codec: els.format.value };
  }

  // A new utterance replaces the one playing: one voice at a time.
  async function begin() {
    if (current) current.stop();
    if (live.u) live.u = null;
    const u = new Utterance(settings());
    current = u;
    updateButtons();
    els.ttfa.textContent = "…";
    delete els.ttfa.dataset.ms;
    els.underruns.textContent = "0";
    showStatus("Connecting…");
    renderCaptions(u);
    try {
      await Promise.all([ensureAudio(), connect()]);
    } catch (err) {
      contexts.delete(u.id);
      if (current === u) current = null;
      updateButtons();
      showStatus(err.message, true);
      if (err.needsToken) {
        els.auth.open = true;
        els.token.focus();
      }
      return null;
    }
    if (u.stopped) return null;
    u.open();
    showStatus("Speaking…");
    return u;
  }

  async function speak() {
    const text = els.text.value;
    if (!text.trim()) {
      showStatus("Type something to speak first.", true);
      return;
    }
    live.sentUpTo = text.length; // speak-as-I-type carries on after what Speak said
    live.prev = text;
    const u = await begin();
    if (!u) return;
    u.sendText(text);
    u.end();
  }

  function stop() {
    if (current) current.stop();
    live.u = null;
    live.prev = els.text.value;
    live.sentUpTo = live.prev.length;
    clearTimeout(live.timer);
    updateButtons();
    showStatus("Stopped.");
  }

  // Speak as I type: the box is a token stream. Characters appended at the end are sent as `text` a
  // whole word at a time (the word being typed waits for a space or punctuation, so fixing it costs
  // nothing); a typing pause sends that word and a `flush`, so a half-typed sentence is spoken. Text
  // already sent cannot be taken back: an edit to it is not spoken, and typing goes on from the new
  // end of the box. Emptying the box, unticking the mode, or Speak ends the utterance (`end`), so what
  // was sent is spoken to the end; Stop cancels it.
  const live = { u: null, starting: null, sentUpTo: 0, prev: "", timer: 0 };

  // Where the sent part of the box ends after an edit turned `prev` into `value`.
  function rebase(prev, value, sentUpTo) {
    const max = Math.min(prev.length, value.length);
    let p = 0;
    while (p < max && prev[p] === value[p]) p++;
    if (p >= sentUpTo) return sentUpTo; // the change is after the sent part
    let s = 0;
    while (s < max - p && prev[prev.length - 1 - s] === value[value.length - 1 - s]) s++;
    if (prev.length - s <= sentUpTo) return sentUpTo + value.length - prev.length; // inside it: shift
    return p; // across its end: what was typed from the edit on is new text
  }

  async function liveUtterance() {
    if (live.u && !live.u.stopped && !live.u.ended) return live.u;
    if (!live.starting) {
      live.starting = begin().then((u) => {
        live.u = u;
        live.starting = null;
        return u;
      });
    }
    return live.starting;
  }

  async function liveSend(text, andFlush) {
    const u = await liveUtterance();
    if (!u) return;
    u.sendText(text);
    if (andFlush) u.flush();
  }

  function onType() {
    const value = els.text.value;
    live.sentUpTo = Math.min(rebase(live.prev, value, live.sentUpTo), value.length);
    live.prev = value;
    if (!els.live.checked) return;
    clearTimeout(live.timer);
    if (!value) {
      if (live.u) live.u.end();
      live.u = null;
      live.sentUpTo = 0;
      return;
    }
    const pending = value.slice(live.sentUpTo);
    let cut = 0;
    for (let i = pending.length; i > 0; i--) {
      if (BOUNDARY.test(pending[i - 1])) {
        cut = i;
        break;
      }
    }
    if (cut) {
      live.sentUpTo += cut;
      liveSend(pending.slice(0, cut), false);
    }
    live.timer = setTimeout(() => {
      const rest = els.text.value.slice(live.sentUpTo);
      live.sentUpTo = els.text.value.length;
      if (rest || live.u) liveSend(rest, true);
    }, PAUSE_MS);
  }

  function onLiveToggle() {
    clearTimeout(live.timer);
    live.prev = els.text.value;
    live.sentUpTo = live.prev.length; // only what is typed from now on
    if (!els.live.checked && live.u) {
      live.u.end();
      live.u = null;
    }
  }

  async function loadVoices() {
    for (;;) {
      try {
        const response = await fetch(new URL("v1/voices", document.baseURI), { cache: "no-store" });
        if (response.ok) {
          const voices = await response.json();
          els.voice.replaceChildren(
            ...voices.map((v) => {
              const option = new Option(v.default ? v.name + " (default)" : v.name, v.name);
              option.selected = Boolean(v.default);
              return option;
            }),
          );
          els.voice.disabled = false;
          return;
        }
        showStatus("The daemon is loading its model…");
      } catch (err) {
        showStatus("Cannot reach the daemon: " + err.message, true);
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  async function checkCodecs() {
    let opus = typeof window.AudioDecoder === "function";
    if (opus) {
      try {
        const support = await AudioDecoder.isConfigSupported({
          codec: "opus",
          sampleRate: OPUS_RATE,
          numberOfChannels: 1,
        });
        opus = support.supported === true;
      } catch {
        opus = false;
      }
    }
    const option = els.format.querySelector('option[value="opus"]');
    option.disabled = !opus;
    if (!opus) {
      els.format.value = "pcm16";
      els.codecNote.textContent = "This browser cannot decode Opus (no WebCodecs AudioDecoder): PCM it is.";
    }
  }

  function init() {
    if (!window.isSecureContext || !window.AudioWorkletNode) {
      showStatus(
        "This page needs a secure context for audio: open it over https, or as http://localhost.",
        true,
      );
    }
    els.token.value = sessionStorage.getItem(TOKEN_KEY) || "";
    els.token.addEventListener("input", () => {
      const value = token();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    }); // the next utterance connects with the new token (see connect)
    els.forget.addEventListener("click", () => {
      els.token.value = "";
      sessionStorage.removeItem(TOKEN_KEY);
    });
    els.speed.addEventListener("input", () => {
      els.speedOut.textContent = Number(els.speed.value).toFixed(2) + "×";
    });
    els.speak.addEventListener("click", speak);
    els.stop.addEventListener("click", stop);
    els.text.addEventListener("input", onType);
    els.live.addEventListener("change", onLiveToggle);
    live.prev = els.text.value;
    live.sentUpTo = live.prev.length;
    updateButtons();
    checkCodecs();
    loadVoices();
  }

  init();
})();
