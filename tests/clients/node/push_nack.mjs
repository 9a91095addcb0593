// PushConsumer nack/redelivery test with the official Node.js client.
// Sends N messages, then a PushConsumer whose listener returns FAILURE the
// first time it sees a message and SUCCESS the second time. Verifies each
// message is delivered exactly twice (attempts 1 then 2), intact, and not a
// third time within a grace period.
// usage: node push_nack.mjs --endpoint H:P --topic T --group G [--count N]
import * as t from './common.mjs';

const opts = t.parseOptions({
  count: { type: 'string', default: '5' },
  tag: { type: 'string', default: 'TagA' },
  wait: { type: 'string', default: '60' },
  grace: { type: 'string', default: '5' },
}, [ 'endpoint', 'topic', 'group' ]);
t.startWatchdog(Number(opts.timeout), 'push_nack');

const deliveries = new Map(); // message id -> [view dict]
const listener = {
  consume(mv) {
    const d = t.viewToDict(mv);
    const seen = deliveries.get(d.message_id) || [];
    seen.push(d);
    deliveries.set(d.message_id, seen);
    const first = seen.length === 1;
    t.log(`consume ${d.message_id} attempt=${d.delivery_attempt} -> ${first ? 'FAILURE' : 'SUCCESS'}`);
    return first ? t.rmq.ConsumeResult.FAILURE : t.rmq.ConsumeResult.SUCCESS;
  },
};

let producer;
let consumer;
let sent = [];
const errors = [];
try {
  producer = new t.rmq.Producer({ ...t.clientOptions(opts), topics: [ opts.topic ] });
  await t.withTimeout(producer.startup(), 30000, 'producer startup (QueryRoute + Telemetry settings)');
  const r = await t.sendMessages(producer, opts.topic, Number(opts.count), opts.tag, t.newRunId());
  sent = r.sent;
  errors.push(...r.errors);
  await t.safeShutdown(producer, 'producer');
  producer = undefined;
  t.log(`sent ${sent.length} message(s); starting push consumer`);

  consumer = new t.rmq.PushConsumer({
    ...t.clientOptions(opts),
    consumerGroup: opts.group,
    subscriptions: new Map([[ opts.topic, '*' ]]),
    messageListener: listener,
  });
  await t.withTimeout(consumer.startup(), 30000, 'push consumer startup (QueryRoute + Telemetry settings)');
  const want = new Map(sent.map(m => [ m.message_id, m ]));
  const deadline = Date.now() + Number(opts.wait) * 1000;
  while (Date.now() < deadline) {
    if ([ ...want.keys() ].every(mid => (deliveries.get(mid) || []).length >= 2)) break;
    await t.sleep(200);
  }
  await t.sleep(Number(opts.grace) * 1000);
  for (const [ mid, exp ] of want) {
    const got = deliveries.get(mid) || [];
    const attempts = got.map(g => g.delivery_attempt);
    if (got.length !== 2) errors.push(`${mid}: delivered ${got.length} time(s) (attempts ${JSON.stringify(attempts)}), expected 2`);
    if (JSON.stringify(attempts.slice(0, 2)) !== JSON.stringify([ 1, 2 ].slice(0, Math.min(2, attempts.length)))) {
      errors.push(`${mid}: delivery attempts ${JSON.stringify(attempts)}, expected [1,2]`);
    }
    for (const g of got) errors.push(...t.compareMessage(exp, g));
  }
  for (const mid of deliveries.keys()) if (!want.has(mid)) errors.push(`unexpected message ${mid}`);
} catch (e) {
  errors.push(`client error: ${e && (e.stack || e.message)}`);
}
await t.safeShutdown(producer, 'producer');
// PushConsumer.shutdown() waits for in-flight long polls (up to request timeout +
// long polling timeout); do not let that dominate the test time.
await t.safeShutdown(consumer, 'push consumer', 3000);
const attempts = Object.fromEntries([ ...deliveries ].map(([ k, v ]) => [ k, v.map(g => g.delivery_attempt) ]));
for (const e of errors) t.log('FAIL: ' + e);
t.emit({ client: t.LANG, ok: errors.length === 0, topic: opts.topic, group: opts.group,
  sent_ids: sent.map(m => m.message_id), attempts, errors });
t.finish(errors.length === 0 ? 0 : 1);
