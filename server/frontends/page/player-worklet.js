// speakd's playback jitter buffer, on the audio rendering thread.
//
// The page decodes on the main thread (WebCodecs does not exist in a worklet) and posts Float32 PCM at
// the AudioContext's rate. Audio arrives in bursts, a sentence at a time, so playback waits for a short
// pre-buffer before it starts. When it runs dry while the page still expects audio (an underrun: real
// starvation), it plays silence and waits for a pre-buffer twice as long (up to 0.8 s), so a stream that
// arrives slower than real time stutters less often; each 2 s of steady playback halves a grown
// pre-buffer again. When the page says it is caught up (`idle`: every word of the text it sent and
// flushed has its audio here), whatever is buffered plays at once, and running dry is no underrun: the
// daemon simply has nothing more to say until more text comes. The worklet reports how much of the
// stream it has played: the page times captions and time to first audio by that, not by what has
// arrived. The ring is bounded; the page keeps the rest encoded and feeds it as the reported position
// moves (flow control), so a long text costs little memory here.
//
// Messages in: begin {gen} (a new stream; silences the old one), push {gen, samples}, idle {gen, on}
// (the page is caught up: play what is buffered; running dry is no underrun), end {gen} (no more audio:
// let a tail shorter than the pre-buffer play), stop {} (silence now, drop everything), tap {on} (copy
// every output block to the page, for tests and measurements).
// Messages out: status {gen, frame, played, lastOut, buffered, underruns, prebuffer, playing,
// startedFrame, dropped}, drained {gen, frame, played}, stopped {frame}, tap {frame, samples}.

const STATUS_EVERY = 4; // render quanta between status reports: about 10 ms at 48 kHz
const FADE_MS = 3; // a stop ramps down this fast instead of clicking
const TAP_CHUNK = 4096;

class SpeakdPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.capacity = Math.max(1, Math.round(sampleRate * (opts.capacitySeconds || 10)));
    this.initialPrebuffer = Math.max(1, Math.round((sampleRate * (opts.prebufferMs || 100)) / 1000));
    this.maxPrebuffer = Math.round(sampleRate * 0.8);
    this.ring = new Float32Array(this.capacity);
    this.gen = 0;
    this.fade = null;
    this.tap = null;
    this.quanta = 0;
    this.reset();
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  reset() {
    this.prebuffer = this.initialPrebuffer;
    this.steady = 0; // frames played since the last underrun (or since the pre-buffer last shrank)
    this.idle = false;
    this.lastOut = -1; // the render frame just after the last sample played
    this.head = 0;
    this.size = 0;
    this.active = false;
    this.playing = false;
    this.finished = false;
    this.played = 0;
    this.underruns = 0;
    this.startedFrame = -1;
    this.dropped = 0;
  }

  onMessage(msg) {
    switch (msg.type) {
      case "begin":
        this.silence();
        this.reset();
        this.gen = msg.gen;
        this.active = true;
        break;
      case "push":
        if (msg.gen === this.gen && this.active) this.write(msg.samples);
        break;
      case "idle":
        if (msg.gen === this.gen) this.idle = msg.on;
        break;
      case "end":
        if (msg.gen === this.gen) this.finished = true;
        break;
      case "stop":
        this.silence();
        this.reset();
        this.port.postMessage({ type: "stopped", frame: currentFrame });
        break;
      case "tap":
        this.tap = msg.on ? { buf: new Float32Array(TAP_CHUNK), fill: 0, frame: -1 } : null;
        break;
    }
  }

  // Keep the next few ms as a ramp to zero, so cutting playback does not click; drop the rest.
  silence() {
    if (!this.playing || !this.size) return;
    const n = Math.min(this.size, Math.round((sampleRate * FADE_MS) / 1000));
    const ramp = new Float32Array(n);
    for (let i = 0; i < n; i++) ramp[i] = this.ring[(this.head + i) % this.capacity] * (1 - (i + 1) / n);
    this.fade = { buf: ramp, pos: 0 };
  }

  write(samples) {
    const room = this.capacity - this.size;
    const n = Math.min(room, samples.length);
    this.dropped += samples.length - n; // never with the page's flow control; counted if it happens
    let tail = (this.head + this.size) % this.capacity;
    const first = Math.min(n, this.capacity - tail);
    this.ring.set(samples.subarray(0, first), tail);
    if (n > first) this.ring.set(samples.subarray(first, n), 0);
    this.size += n;
  }

  process(inputs, outputs) {
    const channels = outputs[0];
    const out = channels[0];
    const frames = out.length;
    out.fill(0);
    let i = 0;
    if (this.fade) {
      const { buf, pos } = this.fade;
      const n = Math.min(frames, buf.length - pos);
      out.set(buf.subarray(pos, pos + n), 0);
      this.fade.pos += n;
      if (this.fade.pos >= buf.length) this.fade = null;
      i = frames; // the new stream (if any) starts in the next block
    }
    let changed = false;
    if (this.active && i < frames) {
      if (this.finished && !this.playing && this.size === 0) {
        this.active = false; // a stream that ended without (more) audio
        this.drained(currentFrame + i);
      }
      const ready = this.size >= this.prebuffer || this.finished || this.idle;
      if (!this.playing && this.size > 0 && ready) {
        this.playing = true;
        if (this.startedFrame < 0) this.startedFrame = currentFrame + i;
        changed = true;
      }
      if (this.playing) {
        const take = Math.min(frames - i, this.size);
        const first = Math.min(take, this.capacity - this.head);
        out.set(this.ring.subarray(this.head, this.head + first), i);
        if (take > first) out.set(this.ring.subarray(0, take - first), i + first);
        this.head = (this.head + take) % this.capacity;
        this.size -= take;
        this.played += take;
        i += take;
        this.lastOut = currentFrame + i;
        this.steady += take;
        if (this.steady >= 2 * sampleRate && this.prebuffer > this.initialPrebuffer) {
          this.prebuffer = Math.max(this.initialPrebuffer, Math.round(this.prebuffer / 2));
          this.steady = 0;
        }
        if (this.size === 0) {
          changed = true;
          if (this.finished) {
            this.active = false;
            this.playing = false;
            this.drained(currentFrame + i);
          } else if (this.idle) {
            this.playing = false; // said all there is to say for now: wait for more, no underrun
          } else if (i < frames) {
            // Ran dry while audio was still owed: wait for the pre-buffer again, a longer one each time,
            // so a stream that arrives slower than real time stutters less often.
            this.underruns += 1;
            this.steady = 0;
            this.playing = false;
            this.prebuffer = Math.min(this.prebuffer * 2, Math.max(this.maxPrebuffer, this.initialPrebuffer));
          }
        }
      }
    }
    for (let c = 1; c < channels.length; c++) channels[c].set(out);
    if (this.tap) this.record(out);
    this.quanta += 1;
    if (changed || (this.active && this.quanta % STATUS_EVERY === 0)) this.status(frames);
    return true;
  }

  drained(frame) {
    this.port.postMessage({ type: "drained", gen: this.gen, frame, played: this.played });
  }

  status(frames) {
    this.port.postMessage({
      type: "status",
      gen: this.gen,
      frame: currentFrame + frames,
      played: this.played,
      lastOut: this.lastOut,
      buffered: this.size,
      underruns: this.underruns,
      prebuffer: this.prebuffer,
      playing: this.playing,
      startedFrame: this.startedFrame,
      dropped: this.dropped,
    });
  }

  record(out) {
    const tap = this.tap;
    if (tap.fill === 0) tap.frame = currentFrame;
    tap.buf.set(out, tap.fill);
    tap.fill += out.length;
    if (tap.fill + out.length > tap.buf.length) {
      const samples = tap.buf.slice(0, tap.fill);
      this.port.postMessage({ type: "tap", frame: tap.frame, samples }, [samples.buffer]);
      tap.fill = 0;
    }
  }
}

registerProcessor("speakd-player", SpeakdPlayer);
