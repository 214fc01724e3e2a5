// The Node.js client of Weir's public API (weir.v1): service clients that send the tenant's
// API key with every call, and the google.rpc details of the errors they get.
import { existsSync, readdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { join } from 'node:path';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';
import protobuf from 'protobufjs';

export const { status } = grpc;

// A packed package carries its own copy (`npm pack` runs scripts/copy-protos.js); a checkout
// reads the repository's protos/.
const PROTOS = [new URL('../protos', import.meta.url), new URL('../../../protos', import.meta.url)]
  .map(fileURLToPath)
  .find((dir) => existsSync(join(dir, 'weir/v1')));
if (!PROTOS) throw new Error('@weir/client: the weir.v1 protos are missing');

// Field names as in the protos and in grpcurl's JSON (task_id, not taskId); enums by name;
// int64s as strings (no precision lost); bytes as Buffers; unset fields at their defaults.
const LOAD_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

const v1 = grpc.loadPackageDefinition(protoLoader.loadSync(
  readdirSync(join(PROTOS, 'weir/v1')).filter((f) => f.endsWith('.proto')).map((f) => `weir/v1/${f}`),
  { ...LOAD_OPTIONS, includeDirs: [PROTOS] },
)).weir.v1;

/**
 * Connects to a Weir gateway. Unary methods return promises
 * (`await weir.tasks.getTask({ task_id })`); streaming ones return grpc-js streams, which are
 * async-iterable (`for await (const { stage, task } of weir.tasks.watchTask({ task_id }))`).
 * Every method takes grpc-js call options after the request, e.g. `{ deadline }`.
 *
 * @param {string} address the gateway, `host:port`
 * @param {string} apiKey the tenant's API key
 * @param {{ tls?: boolean | grpc.ChannelCredentials }} [options] `true` for TLS with the
 *   system's roots, or credentials of your own; plaintext by default (a local suite)
 */
export function connect(address, apiKey, { tls = false } = {}) {
  const credentials = tls === true ? grpc.credentials.createSsl()
    : tls || grpc.credentials.createInsecure();
  // The key goes in by an interceptor, not call credentials: grpc-js sends those only over TLS.
  const bearer = (options, next) => new grpc.InterceptingCall(next(options), {
    start(metadata, listener, start) {
      metadata.set('authorization', `Bearer ${apiKey}`);
      start(metadata, listener);
    },
  });
  const channel = new grpc.Channel(address, credentials, {});
  const client = (Service) => promised(new Service(address, credentials,
    { channelOverride: channel, interceptors: [bearer] }));
  return {
    tasks: client(v1.TaskService),
    functions: client(v1.FunctionService),
    deadLetters: client(v1.DeadLetterService),
    operations: client(v1.OperationService),
    tenants: client(v1.TenantService),
    close: () => channel.close(),
  };
}

// The client's methods by their camelCase names, the unary ones as promises.
function promised(client) {
  const methods = {};
  for (const { originalName, requestStream, responseStream } of Object.values(client.constructor.service)) {
    const call = client[originalName].bind(client);
    methods[originalName] = requestStream || responseStream ? call
      : (request, options = {}) => new Promise((resolve, reject) => {
        call(request, options, (error, response) => (error ? reject(error) : resolve(response)));
      });
  }
  return methods;
}

const rpc = new protobuf.Root();
rpc.resolvePath = (_origin, target) => join(PROTOS, target); // google/protobuf/* are built in
rpc.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const Status = rpc.lookupType('google.rpc.Status');

/**
 * The `google.rpc.Status` of a failed call, from its `grpc-status-details-bin` trailer:
 * `{ code, message, details }`, each detail decoded with its `@type`
 * (`type.googleapis.com/google.rpc.BadRequest`, `…RetryInfo`, `…ErrorInfo`, …). A status
 * without that trailer has no details.
 *
 * @param {grpc.ServiceError} error
 */
export function errorDetails(error) {
  const [bytes] = error.metadata?.get('grpc-status-details-bin') ?? [];
  if (!bytes) return { code: error.code, message: error.details, details: [] };
  // json: Any values are decoded by their type_url (protobufjs' own Any wrapper).
  return Status.toObject(Status.decode(bytes), { ...LOAD_OPTIONS, json: true });
}

/**
 * The first detail of a type, e.g. `detail(errorDetails(error), 'google.rpc.BadRequest')`.
 */
export function detail(statusObject, typeName) {
  return statusObject.details.find((d) => d['@type'].endsWith(`/${typeName}`));
}
