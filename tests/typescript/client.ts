// A small client of the MyFlix API, typed only by what openapi-typescript generated from the
// running service's /openapi.json (./schema.ts, written by tests/test_typescript_client.py).
// It compiles under `tsc --strict` only if the schema names its operations as methods and
// says what the server sends: what it always sends is required, what it leaves out is
// optional and never null.
import type { components, operations } from "./schema";

type Schemas = components["schemas"];
export type ProgressEvent = Schemas["ProgressEvent"];
export type DoneEvent = Schemas["DoneEvent"];
export type ErrorEvent = Schemas["ErrorEvent"];
export type KeepaliveEvent = Schemas["KeepaliveEvent"];

type JsonBody<Op> = Op extends { requestBody: { content: { "application/json": infer Body } } } ? Body : never;
type JsonAnswer<Op, Status extends number> = Op extends {
  responses: { [S in Status]: { content: { "application/json": infer Answer } } };
}
  ? Answer
  : never;

export type StreamEvent =
  | { event: "progress"; id: string; data: ProgressEvent }
  | { event: "done"; id: string; data: DoneEvent }
  | { event: "error"; id: string; data: ErrorEvent }
  | { event: "keepalive"; data: KeepaliveEvent };

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly detail: unknown,
  ) {
    super(`HTTP ${status}`);
  }
}

export class MyFlixClient {
  private token: string | undefined;

  constructor(private readonly baseUrl: string) {}

  async login(body: JsonBody<operations["login"]>): Promise<JsonAnswer<operations["login"], 200>> {
    const answer: JsonAnswer<operations["login"], 200> = await this.json("POST", "/api/auth/login", body);
    this.token = answer.access_token;
    return answer;
  }

  createJob(body: JsonBody<operations["createJob"]>): Promise<JsonAnswer<operations["createJob"], 202>> {
    return this.json("POST", "/api/generate/", body);
  }

  getJob(jobId: operations["getJob"]["parameters"]["path"]["job_id"]): Promise<JsonAnswer<operations["getJob"], 200>> {
    return this.json("GET", `/api/generate/${encodeURIComponent(jobId)}`);
  }

  listJobs(
    query: NonNullable<operations["listJobs"]["parameters"]["query"]> = {},
  ): Promise<JsonAnswer<operations["listJobs"], 200>> {
    const search = new URLSearchParams();
    if (query.limit !== undefined) search.set("limit", String(query.limit));
    if (query.cursor !== undefined && query.cursor !== null) search.set("cursor", query.cursor);
    return this.json("GET", `/api/generate/?${search}`);
  }

  cancelJob(jobId: string): Promise<JsonAnswer<operations["cancelJob"], 202>> {
    return this.json("POST", `/api/generate/${encodeURIComponent(jobId)}/cancel`);
  }

  /** The job's events, parsed into the generated event types, until the server ends the stream. */
  async *streamJob(jobId: string, lastEventId?: string): AsyncGenerator<StreamEvent> {
    const headers: Record<string, string> = { ...this.authorization(), Accept: "text/event-stream" };
    if (lastEventId !== undefined) headers["Last-Event-ID"] = lastEventId;
    const response = await fetch(`${this.baseUrl}/api/generate/${encodeURIComponent(jobId)}/stream`, { headers });
    if (response.status === 204 || response.body === null) return;
    if (!response.ok) throw new ApiError(response.status, await response.json());
    const decoder = new TextDecoder();
    let buffered = "";
    let message: { event: string; id: string; data: string[] } = { event: "message", id: "", data: [] };
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      buffered += decoder.decode(value, { stream: true });
      const lines = buffered.split(/\r\n|\r|\n/);
      buffered = lines.pop() ?? "";
      for (const line of lines) {
        if (line === "") {
          if (message.data.length > 0) yield parseEvent(message.event, message.id, message.data.join("\n"));
          message = { event: "message", id: message.id, data: [] };
          continue;
        }
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        const text = colon === -1 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") message.event = text;
        else if (field === "id") message.id = text;
        else if (field === "data") message.data.push(text);
      }
    }
  }

  /** An image link from an event or snapshot: no token, binary image content. */
  async getImage(url: string): Promise<{ type: ImageMediaType; bytes: Blob }> {
    const response = await fetch(url);
    if (!response.ok) throw new ApiError(response.status, await response.json());
    return { type: response.headers.get("content-type") as ImageMediaType, bytes: await response.blob() };
  }

  private authorization(): Record<string, string> {
    return this.token === undefined ? {} : { Authorization: `Bearer ${this.token}` };
  }

  private async json<Answer>(method: string, path: string, body?: unknown): Promise<Answer> {
    const headers: Record<string, string> = { ...this.authorization() };
    const init: RequestInit = { method, headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(`${this.baseUrl}${path}`, init);
    const answer: unknown = await response.json();
    if (!response.ok) throw new ApiError(response.status, answer);
    return answer as Answer;
  }
}

function parseEvent(name: string, id: string, data: string): StreamEvent {
  const parsed: unknown = JSON.parse(data);
  switch (name) {
    case "progress":
      return { event: name, id, data: parsed as ProgressEvent };
    case "done":
      return { event: name, id, data: parsed as DoneEvent };
    case "error":
      return { event: name, id, data: parsed as ErrorEvent };
    case "keepalive":
      return { event: name, data: parsed as KeepaliveEvent };
    default:
      throw new Error(`unknown event ${name}`);
  }
}

// What the schema must say, checked by the compiler ------------------------------------------

type Is<T extends true> = T;
type Never<T> = [T] extends [never] ? true : false;

// Operations are named as methods, and these are all of them.
const OPERATION_IDS = [
  "login",
  "issueToken",
  "getMe",
  "register",
  "refreshToken",
  "logout",
  "changePassword",
  "getAuthSettings",
  "getUsage",
  "listUsers",
  "updateUser",
  "createJob",
  "listJobs",
  "getJob",
  "cancelJob",
  "deleteJob",
  "streamJob",
  "getImage",
  "getHealth",
  "getReadiness",
  "getMetrics",
] as const satisfies readonly (keyof operations)[];
export type OnlyTheseOperations = Is<Never<Exclude<keyof operations, (typeof OPERATION_IDS)[number]>>>;

// No schema is named after FastAPI's Body_<function>_<path> default.
export type NoDefaultBodyNames = Is<Never<Extract<keyof Schemas, `Body_${string}`>>>;
export type TokenFormFields = Is<"username" | "password" extends keyof Schemas["TokenForm"] ? true : false>;

// The image endpoint answers binary images.
type ImageMediaType = keyof operations["getImage"]["responses"][200]["content"];
export type ImageTypes = Is<Never<Exclude<"image/png" | "image/jpeg" | "image/webp", ImageMediaType>>>;

// A progress event's fields without a value are left out: optional, and never null.
export const queued: ProgressEvent = { job_id: "job_1", index: 0, status: "queued", elapsed_ms: 0, completed: 0, total: 1 };
// @ts-expect-error: url is never null on the wire
export const nullUrl: ProgressEvent = { ...queued, url: null };
// @ts-expect-error: nor is attempt
export const nullAttempt: ProgressEvent = { ...queued, attempt: null };

// A snapshot's image always carries every field, null when it has none.
export const queuedImage: Schemas["ImageResult"] = {
  index: 0,
  status: "queued",
  url: null,
  error: null,
  latency_ms: null,
  queue_position: 1,
};
// @ts-expect-error: url is always there
export const imageWithoutUrl: Schemas["ImageResult"] = { index: 0, status: "queued", error: null, latency_ms: null, queue_position: 1 };

// A token answer always says its type.
export type TokenTypeRequired = Is<undefined extends JsonAnswer<operations["login"], 200>["token_type"] ? false : true>;

// How a client uses it.
export async function generate(baseUrl: string, prompt: string): Promise<(string | null)[]> {
  const client = new MyFlixClient(baseUrl);
  await client.login({ email: "alice@myflix.dev", password: "alice-wonderland" });
  const { job_id } = await client.createJob({ prompt, num_images: 2 });
  for await (const message of client.streamJob(job_id)) {
    if (message.event === "progress" && message.data.url !== undefined) await client.getImage(message.data.url);
    if (message.event === "done") return message.data.images.map((image) => image.url);
    if (message.event === "error") throw new Error(message.data.message);
  }
  return (await client.getJob(job_id)).images.map((image) => image.url);
}
