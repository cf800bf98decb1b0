// The HTTP API as the page uses it: models, submit, watch (SSE), cancel.
// Every failure becomes an ApiError carrying the API's own {code, message, field}.

export class ApiError extends Error {
  constructor(status, code, message, field = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's HTML page...): fall through to the status line
  }
  const e = body && body.error;
  let message = e && e.message ? e.message : `HTTP ${response.status} ${response.statusText}`;
  const retry = response.headers.get("Retry-After");
  if (response.status === 429 && retry) message += ` (retry in ${retry} s)`;
  return new ApiError(response.status, e ? e.code : "http_error", message, e ? e.field : null);
}

async function call(method, url, body) {
  let response;
  try {
    response = await fetch(url, {
      method,
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (exc) {
    throw new ApiError(0, "network", `cannot reach the API: ${exc.message}`);
  }
  if (!response.ok) throw await errorFrom(response);
  return { status: response.status, body: await response.json() };
}

export async function listModels() {
  return (await call("GET", "/v1/models")).body;
}

// Whether this server's generate route takes `preview` (live previews in progress events).
// Asked of the OpenAPI document, so an older server simply gets no preview requests.
export async function acceptsPreview() {
  try {
    const doc = (await call("GET", "/openapi.json")).body;
    const content = doc.paths["/v1/generate"].post.requestBody.content["application/json"];
    let schema = content.schema;
    if (schema.$ref) schema = doc.components.schemas[schema.$ref.split("/").pop()];
    return Boolean(schema.properties && schema.properties.preview);
  } catch {
    return false;
  }
}

export async function submit(body) {
  return (await call("POST", "/v1/generate", body)).body; // 202: {id, status, warnings}
}

export async function cancel(jobId) {
  return call("DELETE", `/v1/jobs/${encodeURIComponent(jobId)}`);
}

// Follows a job's Server-Sent Events. handlers: status, queue, progress, stage (a chained job
// moved to its next model: {model, task}), done, lost.
// Returns a function that stops listening.
export function watch(jobId, handlers) {
  const source = new EventSource(`/v1/jobs/${encodeURIComponent(jobId)}/events`);
  const on = (name, fn) =>
    source.addEventListener(name, (event) => fn(JSON.parse(event.data)));
  on("status", handlers.status);
  on("queue", handlers.queue);
  on("progress", handlers.progress);
  on("stage", handlers.stage || (() => {}));
  on("done", (job) => {
    source.close(); // else EventSource reconnects once the server ends the stream
    handlers.done(job);
  });
  source.onerror = () => {
    // CONNECTING: the browser retries by itself, and the stream starts with the job's
    // status again. CLOSED: the server refused (an unknown or expired job).
    if (source.readyState === EventSource.CLOSED) handlers.lost();
  };
  return () => source.close();
}
