// Receive messages with the official Node.js SimpleConsumer, ack them and
// verify them against a send manifest.
// usage: node receive_only.mjs --endpoint H:P --topic T --group G --expect-file SENT.json
//          [--expect-count N] [--wait S] [--invisible S]
// Exit code 0 only if every expected message arrived intact, exactly once.
import * as t from './common.mjs';

const opts = t.parseOptions({
  'expect-file': { type: 'string' },
  'expect-count': { type: 'string' },
  wait: { type: 'string', default: '60' },
  invisible: { type: 'string', default: '30' },
  'await-duration': { type: 'string', default: '10' },
  batch: { type: 'string', default: '16' },
  filter: { type: 'string', default: '*' },
  'expect-attempt': { type: 'string', default: '1' },
  'allow-duplicates': { type: 'boolean', default: false },
}, [ 'endpoint', 'topic', 'group' ]);
if (!opts['expect-file'] && opts['expect-count'] === undefined) {
  t.log('need --expect-file or --expect-count');
  process.exit(2);
}
t.startWatchdog(Number(opts.timeout), 'receive_only');

const expected = opts['expect-file'] ? t.loadManifest(opts['expect-file']).messages : [];
const want = new Map(expected.map(m => [ m.message_id, m ]));
const expectCount = opts['expect-count'] !== undefined ? Number(opts['expect-count']) : want.size;
const expectAttempt = Number(opts['expect-attempt']);
const received = new Map();
const unexpected = [];
const duplicates = [];
const errors = [];
let consumer;
try {
  consumer = new t.rmq.SimpleConsumer({
    ...t.clientOptions(opts),
    consumerGroup: opts.group,
    subscriptions: new Map([[ opts.topic, opts.filter ]]),
    awaitDuration: Number(opts['await-duration']) * 1000,
  });
  await t.withTimeout(consumer.startup(), 30000, 'simple consumer startup (QueryRoute + Telemetry settings)');
  const deadline = Date.now() + Number(opts.wait) * 1000;
  while (received.size < expectCount && Date.now() < deadline) {
    let msgs;
    try {
      msgs = await consumer.receive(Number(opts.batch), Number(opts.invisible) * 1000);
    } catch (e) {
      t.log(`receive failed: ${e && e.message}; retrying in 1s`);
      await t.sleep(1000);
      continue;
    }
    for (const mv of msgs || []) {
      const d = t.viewToDict(mv);
      if (received.has(d.message_id)) duplicates.push(d.message_id);
      else if (want.size && !want.has(d.message_id)) unexpected.push(d);
      else received.set(d.message_id, d);
      await consumer.ack(mv);
    }
  }
  if (received.size < expectCount) {
    const missing = [ ...want.keys() ].filter(k => !received.has(k));
    errors.push(`received ${received.size} of ${expectCount} expected message(s) within ${opts.wait}s; missing ids (first 10): ${JSON.stringify(missing.slice(0, 10))}`);
  }
  for (const [ mid, d ] of received) {
    if (want.has(mid)) errors.push(...t.compareMessage(want.get(mid), d));
    if (expectAttempt && d.delivery_attempt !== expectAttempt) {
      errors.push(`${mid}: delivery_attempt ${d.delivery_attempt} != ${expectAttempt}`);
    }
  }
  if (unexpected.length) {
    errors.push(`${unexpected.length} unexpected message(s), e.g. ${unexpected[0].message_id} body=${JSON.stringify(unexpected[0].body.slice(0, 60))}`);
  }
  if (duplicates.length && !opts['allow-duplicates']) {
    errors.push(`${duplicates.length} duplicate deliveries of already received message(s): ${JSON.stringify(duplicates.slice(0, 5))}`);
  }
} catch (e) {
  errors.push(`client error: ${e && (e.stack || e.message)}`);
}
await t.safeShutdown(consumer, 'simple consumer');
for (const e of errors) t.log('FAIL: ' + e);
t.log(`received ${received.size} message(s) from ${opts.topic} as ${opts.group}`);
t.emit({ client: t.LANG, ok: errors.length === 0, topic: opts.topic, group: opts.group,
  received: [ ...received.values() ], errors });
t.finish(errors.length === 0 ? 0 : 1);
