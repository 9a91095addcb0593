// Delay messages with the official Node.js client: send with a delivery time (millisecond
// precision), recall some, and check that each of the others arrives not before its time
// and at most --max-late-ms after it, and that recalled ones never arrive.
//
// usage: node delay.mjs --endpoint H:P --topic T --group G [--mode roundtrip|send|receive]
//          [--count N] [--recall N] [--delay-ms MS] [--expect-file SENT.json]
//   roundtrip  start a SimpleConsumer, send, recall, receive and check (default)
//   send       send and recall only; print the manifest (for a restart in between)
//   receive    receive and check against the manifest of a `send`
import * as t from './common.mjs';

const opts = t.parseOptions({
  mode: { type: 'string', default: 'roundtrip' },
  count: { type: 'string', default: '3' },
  recall: { type: 'string', default: '1' },
  'delay-ms': { type: 'string', default: '3500' },
  'expect-file': { type: 'string' },
  wait: { type: 'string', default: '40' },
  'max-late-ms': { type: 'string', default: '1000' },
}, [ 'endpoint', 'topic' ]);
const mode = opts.mode;
if (![ 'roundtrip', 'send', 'receive' ].includes(mode) || (mode !== 'send' && !opts.group)) {
  t.log('need --mode roundtrip|send|receive, and --group unless sending only');
  process.exit(2);
}
t.startWatchdog(Number(opts.timeout), `delay ${mode}`);
const count = Number(opts.count);
const recallCount = Number(opts.recall);
const maxLate = Number(opts['max-late-ms']);
const errors = [];
const out = { client: t.LANG, topic: opts.topic, mode };

async function sendAndRecall() {
  const producer = new t.rmq.Producer({ ...t.clientOptions(opts), topics: [ opts.topic ] });
  const sent = [];
  try {
    await t.withTimeout(producer.startup(), 30000, 'producer startup');
    const runId = t.newRunId();
    // Not a whole second on purpose: node sends milliseconds.
    const at = Date.now() + Number(opts['delay-ms']);
    for (let i = 0; i < count + recallCount; i++) {
      const spec = t.messageSpec(runId, i, 'delay');
      const receipt = await producer.send({ ...t.toMessageOptions(opts.topic, spec), deliveryTimestamp: new Date(at) });
      if (!receipt.recallHandle) errors.push(`send #${i}: no recall handle for a delay message`);
      Object.assign(spec, { message_id: receipt.messageId, delivery_timestamp_ms: at,
        recall_handle: receipt.recallHandle, recalled: false });
      sent.push(spec);
    }
    for (const spec of sent.slice(count)) {
      const r = await producer.recallMessage(opts.topic, spec.recall_handle);
      if (r.messageId !== spec.message_id) errors.push(`recall returned ${r.messageId}, expected ${spec.message_id}`);
      spec.recalled = true;
    }
    t.log(`sent ${sent.length} delay message(s) due at ${at}, recalled ${recallCount}`);
    if (mode === 'roundtrip') out.producer = producer;
  } finally {
    if (mode !== 'roundtrip') await t.safeShutdown(producer, 'producer');
  }
  return sent;
}

async function receiveAndCheck(consumer, sent) {
  const want = new Map(sent.filter(m => !m.recalled).map(m => [ m.message_id, m ]));
  const recalled = new Set(sent.filter(m => m.recalled).map(m => m.message_id));
  const quietUntil = Math.max(0, ...sent.filter(m => m.recalled).map(m => m.delivery_timestamp_ms)) + 2000;
  const received = new Map();
  const lateness = [];
  const deadline = Date.now() + Number(opts.wait) * 1000;
  while (Date.now() < deadline && (received.size < want.size || Date.now() < quietUntil)) {
    let msgs;
    try {
      msgs = await consumer.receive(16, 30000);
    } catch (e) {
      t.log(`receive failed: ${e && e.message}; retrying in 1s`);
      await t.sleep(1000);
      continue;
    }
    const at = Date.now();
    for (const mv of msgs || []) {
      await consumer.ack(mv);
      const d = t.viewToDict(mv);
      const mid = d.message_id;
      if (recalled.has(mid)) { errors.push(`${mid}: recalled but delivered`); continue; }
      if (!want.has(mid)) { errors.push(`unexpected message ${mid}`); continue; }
      if (received.has(mid)) { errors.push(`${mid}: delivered twice`); continue; }
      received.set(mid, d);
      const exp = want.get(mid);
      errors.push(...t.compareMessage(exp, d));
      const due = exp.delivery_timestamp_ms;
      const got = mv.deliveryTimestamp ? mv.deliveryTimestamp.getTime() : null;
      if (got !== due) errors.push(`${mid}: deliveryTimestamp ${got} != sent ${due}`);
      const late = at - due;
      lateness.push(late);
      if (late < 0) errors.push(`${mid}: received ${-late} ms BEFORE its delivery time`);
      else if (late > maxLate) errors.push(`${mid}: received ${late} ms after its delivery time (limit ${maxLate} ms)`);
    }
  }
  const missing = [ ...want.keys() ].filter(k => !received.has(k));
  if (missing.length) errors.push(`missing ${missing.length} of ${want.size} message(s): ${JSON.stringify(missing.slice(0, 5))}`);
  t.log(`received ${received.size} delay message(s); lateness ms: ${JSON.stringify(lateness.sort((a, b) => a - b))}`);
  out.lateness_ms = lateness;
  return received;
}

let consumer;
try {
  if (mode !== 'send') {
    consumer = new t.rmq.SimpleConsumer({
      ...t.clientOptions(opts),
      consumerGroup: opts.group,
      subscriptions: new Map([[ opts.topic, '*' ]]),
      awaitDuration: 5000,
    });
    await t.withTimeout(consumer.startup(), 30000, 'simple consumer startup');
  }
  const sent = mode === 'receive' ? t.loadManifest(opts['expect-file']).messages : await sendAndRecall();
  out.messages = sent;
  if (consumer) {
    const received = await receiveAndCheck(consumer, sent);
    if (mode === 'roundtrip' && received.size && out.producer) {
      // Recalling a message that was delivered already must fail clearly.
      const first = sent.find(m => !m.recalled);
      try {
        await out.producer.recallMessage(opts.topic, first.recall_handle);
        errors.push('recall after delivery succeeded');
      } catch (e) {
        t.log(`recall after delivery refused as expected: ${e && e.message}`);
      }
    }
  }
} catch (e) {
  errors.push(`client error: ${e && (e.stack || e.message)}`);
}
await t.safeShutdown(out.producer, 'producer');
delete out.producer;
await t.safeShutdown(consumer, 'simple consumer');
for (const e of errors) t.log('FAIL: ' + e);
out.ok = errors.length === 0;
out.errors = errors;
t.emit(out);
t.finish(errors.length === 0 ? 0 : 1);
