// The README tour's steps through this client, against a live gateway
// (tests/interop/test_node_client.py runs it against the test suite's).
import assert from 'node:assert/strict';
import { after, test } from 'node:test';

import { connect, detail, errorDetails, status } from '../src/index.js';

const ENV = ['WEIR_ADDRESS', 'WEIR_API_KEY', 'WEIR_FUNCTION'];
const missing = ENV.filter((name) => !process.env[name]);
if (missing.length) {
  throw new Error(`set ${missing.join(', ')}: the gateway (host:port), a tenant's API key and `
    + 'a function of that tenant whose result is its payload (e.g. examples.demo:echo)');
}
const { WEIR_ADDRESS: address, WEIR_API_KEY: apiKey, WEIR_FUNCTION: fn } = process.env;

const weir = connect(address, apiKey);
after(() => weir.close());
const deadline = () => ({ deadline: Date.now() + 20_000 });

test('a task runs to SUCCEEDED, watched to its end, and its result is the payload', async () => {
  const payload = Buffer.from('hello from Node');
  const created = await weir.tasks.createTask({ task: { function: fn, payload } }, deadline());
  assert.ok(created.task_id);

  const watched = [];
  for await (const message of weir.tasks.watchTask({ task_id: created.task_id }, deadline())) {
    watched.push(message);
  }
  assert.ok(watched.length > 0);
  for (const { stage, task } of watched) {
    assert.equal(task.task_id, created.task_id, 'each message carries the task');
    assert.ok(stage.state.startsWith('TASK_STATE_'));
  }
  assert.equal(watched.at(-1).stage.state, 'TASK_STATE_SUCCEEDED', 'the stream ends at SUCCEEDED');

  const done = await weir.tasks.getTask({ task_id: created.task_id }, deadline());
  assert.equal(done.state, 'TASK_STATE_SUCCEEDED');
  assert.deepEqual(done.result, payload);
});

test('a task_id with a space is INVALID_ARGUMENT, its BadRequest naming task.task_id', async () => {
  const request = { task: { task_id: 'not valid', function: fn, payload: Buffer.from('x') } };
  await assert.rejects(weir.tasks.createTask(request, deadline()), (error) => {
    assert.equal(error.code, status.INVALID_ARGUMENT);
    const rpcStatus = errorDetails(error);
    assert.equal(rpcStatus.code, status.INVALID_ARGUMENT);
    const badRequest = detail(rpcStatus, 'google.rpc.BadRequest');
    assert.deepEqual(badRequest.field_violations.map((v) => v.field), ['task.task_id']);
    return true;
  });
});

test('an unknown API key is UNAUTHENTICATED, its ErrorInfo saying why', async () => {
  const stranger = connect(address, 'not-a-key');
  try {
    await assert.rejects(stranger.tasks.getTask({ task_id: 'any' }, deadline()), (error) => {
      assert.equal(error.code, status.UNAUTHENTICATED);
      const info = detail(errorDetails(error), 'google.rpc.ErrorInfo');
      assert.equal(info.reason, 'API_KEY_INVALID');
      assert.equal(info.domain, 'weir.dev');
      return true;
    });
  } finally {
    stranger.close();
  }
});
