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
  // The model's own rate, for both codecs: the daemon resamples nothing, Chromium decodes Opus to 48 kHz
  // anyway, and PCM at 24 kHz is half the bytes of 48 kHz. The page resamples to the AudioContext's rate.
  const STREAM_RATE = 24000;
  const FRAME_MS = 20;
  const PREBUFFER_MS = 100;
  const RING_SECONDS = 10; // the worklet's ring
  const AHEAD_SECONDS = 6; // decode ahead of playback at most this much; the rest waits encoded
  const PAUSE_MS = 700; // speak-as-I-type: a typing pause this long sends the word being typed and a flush
  const BOUNDARY = /[\s.,;:!?)\]}"'\u2014\u2013-]/u; // a word is complete once one of these follows it
  const CHUNK_CHARS = 1000; // text goes out in pieces this long at most (frames stay far below 64 KiB)
  const AHEAD_CHARS = 2000; // text sent beyond the last word heard, at most (the daemon holds 20000)
  const WORDISH = /[\p{L}\p{N}]/u; // text with one of these has a word still to be spoken

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
    // {index, word, shown, start_ms, end_ms, heard_ms, played_ms, behind_ms, context}: each new word
    highlights: [],
    stops: [], // {frame, context, highlights}: the output clock (and highlights so far) at Stop
    skipped: [], // words heard without ever being highlighted (a status gap longer than the word)
    texts: [], // {context, chars, heardCp}: each `text` sent, with the code points heard by then
    streams: [], // {context, played, posted, rate}: each stream the worklet played to its end
    worklet: null, // the worklet's last status
    events: [], // {type, context, reason, code}: server messages other than audio, in order
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
  let ws = null; // the open socket
  let opening = null; // the socket being opened, until it opens or closes
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
    // The token changed: close the old socket, open or still opening (its contexts are stopped
    // already: one utterance at a time).
    if (ws) ws.close();
    if (opening) opening.close();
    ws = null;
    opening = null;
    wsToken = secret;
    if (secret && !TOKEN_CHARS.test(secret)) {
      wsOpen = null;
      return Promise.reject(new Error("The access token may hold only letters, digits and . _ ~ + -"));
    }
    const protocols = secret ? [PROTOCOL, AUTH_PREFIX + secret] : [PROTOCOL];
    const promise = new Promise((resolve, reject) => {
      const socket = new WebSocket(streamUrl(), protocols);
      socket.binaryType = "arraybuffer";
      opening = socket;
      let opened = false;
      socket.onopen = () => {
        opened = true;
        if (opening === socket) opening = null;
        if (wsOpen === promise) ws = socket;
        resolve(socket);
      };
      socket.onmessage = (event) => onFrame(event.data);
      socket.onclose = async () => {
        if (ws === socket) ws = null;
        if (opening === socket) opening = null;
        if (wsOpen === promise) wsOpen = null;
        if (!opened) {
          if (wsToken !== secret) {
            reject(new Error("The access token changed while connecting."));
            return;
          }
          const [message, needsToken] = await whyRefused(secret);
          reject(Object.assign(new Error(message), { needsToken }));
          return;
        }
        for (const u of [...contexts.values()]) if (u.socket === socket) u.connectionLost();
      };
    });
    wsOpen = promise;
    return promise;
  }

  // A browser does not show why an upgrade failed, so ask doors that apply the same checks: a POST to
  // `metrics` carries the page's Origin (a GET from the same origin does not), so the daemon answers
  // 403 for an origin it does not allow and 401 for a missing or wrong token, the two checks its
  // WebSocket upgrade makes; then `readyz` says whether the model is still loading (503).
  async function whyRefused(secret) {
    try {
      const headers = secret ? { Authorization: "Bearer " + secret } : {};
      const probe = await fetch(new URL("metrics", document.baseURI), {
        method: "POST",
        headers,
        cache: "no-store",
      });
      if (probe.status === 403) {
        return [
          "The daemon does not allow this page's origin. Behind a proxy that rewrites Host, add the " +
            "page's origin to auth.allowed_origins.",
          false,
        ];
      }
      if (probe.status === 401) {
        return secret
          ? ["The daemon refused this access token. Check it under “Access token”.", true]
          : ["This daemon needs an access token: enter it under “Access token”, then try again.", true];
      }
      const ready = await fetch(new URL("readyz", document.baseURI), { cache: "no-store" });
      if (ready.status === 503) {
        return ["The daemon is still loading its model (or shutting down); try again shortly.", false];
      }
    } catch (err) {
      return ["Cannot reach the daemon: " + err.message, false];
    }
    const busy = "The daemon refused the connection (it may be at its connection limit); try again shortly.";
    return [busy, false];
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
      tap.log(tap.events, { type: msg.type, context: msg.context, reason: msg.reason, code: msg.code });
    if (msg.type === "error" && msg.code === "idle_timeout") {
      // The daemon closes a connection left idle; the next utterance simply reconnects.
      if (!current) showStatus("The idle connection was closed; speaking again reconnects.");
      return;
    }
    const u = msg.context == null ? null : contexts.get(msg.context);
    if (msg.type === "error" && (!u || u.stopped)) {
      // unknown_context here is a cancel (or text) that crossed the context's `done`, which said
      // already what happened
      if (msg.code !== "unknown_context") showStatus(errorText(msg), true);
      return;
    }
    if (u) u.onMessage(msg);
  }

  function errorText(msg) {
    let text = msg.message || msg.code;
    if (msg.retry_after_ms != null) text += ` Try again in ${Math.ceil(msg.retry_after_ms / 1000)} s.`;
    return text;
  }

  // Text goes out in pieces of at most CHUNK_CHARS, cut after a sentence end or a space where possible.
  function pieces(text) {
    const out = [];
    while (text.length > CHUNK_CHARS) {
      const head = text.slice(0, CHUNK_CHARS);
      let cut = -1;
      const sentence = /[.!?\n]["')\]]*\s/gu;
      for (let m; (m = sentence.exec(head)); ) cut = m.index + m[0].length;
      if (cut < CHUNK_CHARS / 2) cut = Math.max(cut, head.lastIndexOf(" ") + 1);
      if (cut <= 0) cut = CHUNK_CHARS - (/[\uD800-\uDBFF]/.test(head[CHUNK_CHARS - 1]) ? 1 : 0);
      out.push(text.slice(0, cut));
      text = text.slice(cut);
    }
    if (text) out.push(text);
    return out;
  }

  // --- one utterance: a context on the wire, a stream in the worklet -------------------------------
  class Utterance {
    constructor(settings) {
      this.id = "page-" + nextId++;
      this.gen = ++gen;
      this.settings = settings;
      this.socket = null; // set once `start` went out
      this.outbox = []; // {text} | {flush: true} | {end: true}, waiting to be sent in order (pacing)
      this.text = ""; // everything sent to the context
      this.cpStarts = []; // UTF-16 index of each code point of `text` (the server counts code points)
      this.sentenceCp = 0; // code points of `text` up to its last sentence end
      this.flushedCp = 0; // code points of `text` sent before the last `flush` or `end`
      this.dirty = false; // text queued since the last flush
      this.words = []; // {word, start_ms, end_ms, start, end, cpEnd}: start/end as UTF-16 indices
      this.queue = []; // audio messages not yet decoded
      this.started = null;
      this.error = null; // the daemon's last error about this context
      this.decoder = null;
      this.inDecoder = 0;
      this.trim = null; // decoded samples still to drop (pre_skip at the decoder's rate)
      this.resampler = null;
      this.posted = 0;
      this.played = 0;
      this.heard = 0; // frames heard: never goes back
      this.heardMs = -1;
      this.prevHeardMs = -1;
      this.next = 0; // the first word not yet heard to its end: only ever advances
      this.current = -1; // the word highlighted, or -1 between words
      this.caughtUp = false; // what the worklet was told (`idle`)
      this.done = null;
      this.ended = false; // `end` queued
      this.endSent = false;
      this.finishing = false;
      this.stopped = false;
      this.firstTextAt = null;
      this.firstPlayedAt = null;
      contexts.set(this.id, this);
    }

    open() {
      const s = this.settings;
      this.socket = ws;
      audio.node.port.postMessage({ type: "begin", gen: this.gen });
      this.send({
        type: "start",
        context: this.id,
        voice: s.voice || null,
        speed: s.speed,
        codec: s.codec,
        sample_rate: STREAM_RATE,
        frame_ms: FRAME_MS,
        words: true,
      });
      this.pumpText();
    }

    send(msg) {
      if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(MessagePack.encode(msg));
    }

    sendText(text) {
      if (!text || this.ended || this.stopped) return;
      for (const piece of pieces(text)) this.outbox.push({ text: piece });
      this.dirty = true;
      if (this.firstTextAt === null) this.firstTextAt = performance.now();
      this.pumpText();
    }

    flush() {
      if (this.ended || this.stopped || !this.dirty) return;
      this.dirty = false;
      this.outbox.push({ flush: true });
      this.pumpText();
    }

    end() {
      if (this.ended || this.stopped) return;
      this.ended = true;
      this.outbox.push({ end: true });
      this.pumpText();
    }

    // Send what the outbox holds, keeping at most AHEAD_CHARS sent beyond the last word heard: the
    // daemon's text buffer stays far below its limit, and the audio waiting here stays bounded.
    pumpText() {
      if (this.stopped || !this.socket || this.done) return;
      const heardCp = this.next > 0 ? this.words[this.next - 1].cpEnd : 0;
      const paced = !this.started || this.started.words === true; // a 1.0 daemon times no words
      let sentAny = false;
      while (this.outbox.length) {
        const item = this.outbox[0];
        if (item.text !== undefined) {
          const ahead = this.cpStarts.length - heardCp;
          if (paced && ahead > 0 && ahead + item.text.length > AHEAD_CHARS) break;
          const tail = this.text.slice(-4);
          let unit = this.text.length;
          for (const ch of item.text) {
            this.cpStarts.push(unit);
            unit += ch.length;
          }
          this.text += item.text;
          this.send({ type: "text", context: this.id, text: item.text });
          tap.log(tap.texts, { context: this.id, chars: item.text.length, heardCp });
          let last = -1;
          const sentence = /[.!?\n]["')\]]*\s/gu;
          const seen = tail + item.text;
          for (let m; (m = sentence.exec(seen)); ) last = m.index + m[0].length;
          if (last > 0) this.sentenceCp = this.unitToCodePoint(this.text.length - seen.length + last);
          sentAny = true;
        } else if (item.flush) {
          this.send({ type: "flush", context: this.id });
          this.flushedCp = this.cpStarts.length;
        } else {
          this.send({ type: "end", context: this.id });
          this.flushedCp = this.cpStarts.length;
          this.endSent = true;
        }
        this.outbox.shift();
      }
      if (sentAny) renderCaptions(this);
      this.checkCaughtUp();
    }

    unitToCodePoint(unit) {
      let lo = 0;
      let hi = this.cpStarts.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (this.cpStarts[mid] < unit) lo = mid + 1;
        else hi = mid;
      }
      return lo;
    }

    // Caught up: every word of the text the daemon was asked to speak so far (flushed, ended, or whole
    // sentences) has its audio in the worklet. Then the worklet plays what it holds at once, and
    // running dry is no underrun: the daemon has nothing more to say until more text comes.
    checkCaughtUp() {
      if (this.stopped || !this.started || !audio) return;
      const expected = this.codePointToUnit(Math.max(this.flushedCp, this.sentenceCp));
      const last = this.words.length ? this.words[this.words.length - 1] : null;
      const from = last ? last.end : 0;
      let caught = !(from < expected && WORDISH.test(this.text.slice(from, expected)));
      if (caught && last) caught = (this.posted / audio.ctx.sampleRate) * 1000 + FRAME_MS >= last.end_ms;
      if (this.outbox.length) caught = false;
      if (caught === this.caughtUp) return;
      this.caughtUp = caught;
      audio.node.port.postMessage({ type: "idle", gen: this.gen, on: caught });
    }

    // Stop at once: the worklet drops what it holds now; the server is told, but not waited for.
    stop() {
      if (this.stopped) return;
      this.stopped = true;
      this.queue = [];
      this.outbox = [];
      this.closeDecoder();
      if (audio) {
        const frame = Math.round(audio.ctx.currentTime * audio.ctx.sampleRate);
        tap.log(tap.stops, { frame, context: this.id, highlights: tap.highlights.length });
        if (current === this) audio.node.port.postMessage({ type: "stop" });
      }
      if (this.done || !this.socket) contexts.delete(this.id);
      else this.send({ type: "cancel", context: this.id });
      if (current === this) {
        this.current = -1; // no word is being heard any more
        renderCaptions(this);
        current = null;
      }
    }

    closeDecoder() {
      if (this.decoder && this.decoder.state !== "closed") this.decoder.close();
    }

    // Something went wrong on our side or the daemon's: stop cleanly and say what happened.
    fail(message) {
      if (this.stopped) return;
      const wasCurrent = current === this;
      this.stop();
      if (live.u === this) live.u = null;
      if (wasCurrent) {
        renderCaptions(this, true);
        updateButtons();
        showStatus(message, true);
      }
    }

    connectionLost() {
      contexts.delete(this.id);
      if (this.stopped || this.done) return;
      this.done = { reason: "error" };
      if (live.u === this) live.u = null; // typing on starts a new utterance on a new connection
      if (current === this) {
        const more = els.live.checked ? " Typing on starts a new utterance." : "";
        showStatus("The connection to the daemon closed." + more, true);
      }
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
          this.pumpText();
          break;
        case "words":
          for (const w of msg.words) {
            this.words.push({
              word: w.word,
              start_ms: w.start_ms,
              end_ms: w.end_ms,
              start: this.codePointToUnit(w.char_start),
              end: this.codePointToUnit(w.char_end),
              cpEnd: w.char_end,
            });
          }
          this.checkCaughtUp();
          break;
        case "audio":
          if (this.stopped) return;
          this.queue.push(msg);
          this.pump();
          break;
        case "done":
          this.done = msg;
          contexts.delete(this.id); // the last message of a context
          if (live.u === this) live.u = null; // typing on starts a new utterance
          if (this.stopped) break;
          this.outbox = [];
          this.pump();
          if (msg.reason !== "end" && current === this) {
            const why = this.error ? errorText(this.error) : "The daemon stopped this utterance.";
            showStatus(why + (els.live.checked ? " Typing on starts a new utterance." : ""), true);
          }
          break;
        case "error":
          this.error = msg;
          if (!this.started) {
            this.done = msg;
            // a refused start: no context, and no `done` will follow
            this.fail(errorText(msg));
          } else if (msg.code === "text_too_long") {
            // The daemon dropped a piece of text, so its offsets no longer match ours: stop rather than
            // caption the wrong words. (Pacing keeps this from happening with the default limits.)
            this.fail(errorText(msg) + " The page stopped this utterance.");
          } else {
            showStatus(errorText(msg), true);
          }
          break;
      }
    }

    makeDecoder() {
      this.decoder = new AudioDecoder({
        output: (data) => this.onDecoded(data),
        error: (err) => this.fail("Opus decoding failed: " + err.message),
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
      while (this.queue.length && this.ahead() < limit && !this.stopped) this.feed(this.queue.shift());
      if (this.stopped) return;
      if (this.done && !this.queue.length && !this.finishing) {
        this.finishing = true;
        const flushed =
          this.decoder && this.decoder.state === "configured" ? this.decoder.flush() : Promise.resolve();
        flushed
          .then(() => {
            this.closeDecoder();
            if (!this.stopped) audio.node.port.postMessage({ type: "end", gen: this.gen });
          })
          .catch((err) => this.fail("Opus decoding failed: " + err.message));
      }
    }

    feed(msg) {
      if (this.started.codec === "opus") {
        if (!this.decoder || this.decoder.state !== "configured") {
          const state = this.decoder ? this.decoder.state : "missing";
          this.fail("Opus decoding failed: the decoder is " + state);
          return;
        }
        this.inDecoder += 1;
        const timestamp = msg.seq * this.started.frame_ms * 1000;
        try {
          this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp, data: msg.data }));
        } catch (err) {
          this.fail("Opus decoding failed: " + err.message);
        }
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
      this.checkCaughtUp();
    }

    // The played position from the worklet: highlight the word being heard, show time to first audio.
    onStatus(msg) {
      const ctx = audio.ctx;
      this.played = msg.played;
      els.underruns.textContent = String(msg.underruns);
      tap.worklet = msg;
      if (msg.startedFrame >= 0 && this.firstPlayedAt === null && this.firstTextAt !== null) {
        this.firstPlayedAt = frameToPerf(msg.startedFrame, msg.frame);
        const ms = Math.max(0, Math.round(this.firstPlayedAt - this.firstTextAt));
        els.ttfa.textContent = ms + " ms";
        els.ttfa.dataset.ms = String(ms);
      }
      // What the listener hears now: the played position less what is still on its way out (output
      // frames not yet reached by the device clock). Never back: a word once heard stays heard.
      const behind = msg.lastOut >= 0 ? Math.max(0, msg.lastOut - outputFrame()) : 0;
      this.heard = Math.max(this.heard, msg.played - behind);
      this.heardMs = (this.heard / ctx.sampleRate) * 1000;
      this.highlight((msg.played / ctx.sampleRate) * 1000, (behind / ctx.sampleRate) * 1000);
      this.pump();
    }

    // Words are heard in order, so a cursor that only advances finds the word being heard in O(1).
    highlight(playedMs, behindMs) {
      const at = this.heardMs;
      const before = this.next;
      while (this.next < this.words.length && this.words[this.next].end_ms <= at) {
        const w = this.words[this.next];
        if (this.current !== this.next) {
          tap.log(tap.skipped, {
            index: this.next,
            word: w.word,
            start_ms: w.start_ms,
            end_ms: w.end_ms,
            heard_ms: at,
            prev_heard_ms: this.prevHeardMs,
            context: this.id,
          });
        }
        this.next++;
      }
      this.prevHeardMs = at;
      const w = this.words[this.next];
      const index = w && w.start_ms <= at ? this.next : -1;
      if (this.next !== before) this.pumpText(); // words heard: more text may go out
      if (index === this.current) {
        if (this.next !== before) renderCaptions(this);
        return;
      }
      this.current = index;
      renderCaptions(this);
      if (index >= 0) {
        tap.log(tap.highlights, {
          index,
          word: w.word,
          shown: els.word.textContent,
          start_ms: w.start_ms,
          end_ms: w.end_ms,
          heard_ms: at,
          played_ms: playedMs,
          behind_ms: behindMs,
          context: this.id,
        });
      }
    }
  }

  // The output clock: the frame the listener hears now, from the context's output timestamp when the
  // browser gives one, else the render clock less the reported output latency.
  function outputFrame() {
    const ctx = audio.ctx;
    const stamp = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
    if (stamp && stamp.contextTime > 0) {
      const now = stamp.contextTime + (performance.now() - stamp.performanceTime) / 1000;
      return Math.round(now * ctx.sampleRate);
    }
    const latency = ctx.outputLatency || ctx.baseLatency || 0;
    return Math.round((ctx.currentTime - latency) * ctx.sampleRate);
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
    else if (msg.type === "drained") {
      const rate = audio.ctx.sampleRate;
      tap.log(tap.streams, { context: u.id, played: msg.played, posted: u.posted, rate });
      finish(u);
    }
  }

  function finish(u) {
    if (current !== u) return;
    current = null;
    renderCaptions(u, true);
    if (live.u === u) live.u = null;
    updateButtons();
    if (!els.status.classList.contains("error")) showStatus("Done.");
  }

  // --- captions --------------------------------------------------------------------------------------
  // `all`: the utterance is over, so everything it said was heard.
  function renderCaptions(u, all = false) {
    if (u !== current && current !== null) return;
    const w = !all && u.current >= 0 ? u.words[u.current] : null;
    if (w) {
      els.said.textContent = u.text.slice(0, w.start);
      els.word.textContent = u.text.slice(w.start, w.end);
      els.rest.textContent = u.text.slice(w.end);
    } else {
      // between words, or no word timings: mark what has been heard, if we know
      const heardTo = all && u.done && !u.stopped ? u.text.length : u.next > 0 ? u.words[u.next - 1].end : 0;
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
      if (current === u) {
        current = null;
        showStatus(err.message, true);
        if (err.needsToken) {
          els.auth.open = true;
          els.token.focus();
        }
      }
      updateButtons();
      return null;
    }
    if (u.stopped) {
      contexts.delete(u.id); // stopped while connecting: nothing went out
      return null;
    }
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
    live.backlog = "";
    const u = await begin();
    if (!u) return;
    u.sendText(text);
    u.end();
  }

  function stop() {
    if (current) current.stop();
    live.u = null;
    live.backlog = "";
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
  // was sent is spoken to the end; Stop cancels it. When an utterance ends otherwise (the daemon
  // stopped it, the connection closed), typing on starts a new one; text that could not be sent
  // (no connection) waits in `backlog` and goes with the next try.
  const live = { u: null, starting: null, sentUpTo: 0, prev: "", timer: 0, backlog: "" };

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
    const u = live.u;
    if (u && !u.stopped && !u.ended && !u.done) return u;
    if (!live.starting) {
      live.starting = begin().then((started) => {
        live.u = started;
        live.starting = null;
        return started;
      });
    }
    return live.starting;
  }

  async function liveSend(text, andFlush) {
    live.backlog += text;
    const u = await liveUtterance();
    if (!u) return; // not connected: the text waits in the backlog for the next try
    if (live.backlog) {
      const out = live.backlog;
      live.backlog = "";
      u.sendText(out);
    }
    if (andFlush) u.flush();
  }

  function onType(event) {
    if (event && event.isComposing) {
      clearTimeout(live.timer); // an IME is composing: wait for compositionend
      return;
    }
    const value = els.text.value;
    live.sentUpTo = Math.min(rebase(live.prev, value, live.sentUpTo), value.length);
    live.prev = value;
    if (!els.live.checked) return;
    clearTimeout(live.timer);
    if (!value) {
      if (live.u) live.u.end();
      live.u = null;
      live.backlog = "";
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
      if (rest || live.backlog || (live.u && live.u.dirty)) liveSend(rest, true);
    }, PAUSE_MS);
  }

  function onLiveToggle() {
    clearTimeout(live.timer);
    live.prev = els.text.value;
    live.sentUpTo = live.prev.length; // only what is typed from now on
    live.backlog = "";
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
          sampleRate: STREAM_RATE,
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
    els.text.addEventListener("compositionend", () => onType());
    els.live.addEventListener("change", onLiveToggle);
    live.prev = els.text.value;
    live.sentUpTo = live.prev.length;
    updateButtons();
    checkCodecs();
    loadVoices();
  }

  init();
})();
