// The public API, called with the key the user pasted. The key lives in sessionStorage
// (or localStorage when the user asks to be remembered), never in a URL.

const STORE_NAME = "inferq.key";

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export const key = {
  get() {
    return sessionStorage.getItem(STORE_NAME) || localStorage.getItem(STORE_NAME) || "";
  },
  set(secret, remember) {
    this.forget();
    (remember ? localStorage : sessionStorage).setItem(STORE_NAME, secret);
  },
  forget() {
    sessionStorage.removeItem(STORE_NAME);
    localStorage.removeItem(STORE_NAME);
  },
  remembered() {
    return localStorage.getItem(STORE_NAME) !== null;
  },
};

/** A URL of the API, relative to the page (so that a prefix in front of the API works). */
export function apiUrl(path, query = {}) {
  const url = new URL(path.replace(/^\//, ""), document.baseURI);
  for (const [name, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  return url;
}

export function authHeaders(extra = {}) {
  const secret = key.get();
  if (!secret) throw new ApiError(401, "no_key", "Paste an API key first.");
  return { Authorization: `Bearer ${secret}`, ...extra };
}

/** The error an answer carries: the API's envelope when it has one. */
export async function errorOf(response) {
  let type = "http_error";
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body && body.error) {
      type = body.error.type || type;
      message = body.error.message || message;
    } else if (body && typeof body.detail === "string") {
      message = body.detail;
    }
  } catch {
    // not JSON: the status line says it
  }
  if (response.status === 404 && type === "http_error") message = "Not found on this server.";
  return new ApiError(response.status, type, message);
}

export async function request(method, path, { query, body, signal } = {}) {
  const headers = authHeaders(body === undefined ? {} : { "Content-Type": "application/json" });
  let response;
  try {
    response = await fetch(apiUrl(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network", "The API could not be reached.");
  }
  if (!response.ok) throw await errorOf(response);
  if (response.status === 204) return null;
  return response.json();
}

export const api = {
  models: () => request("GET", "/v1/models"),
  submit: (body) => request("POST", "/v1/jobs", { body }),
  job: (id) => request("GET", `/v1/jobs/${encodeURIComponent(id)}`),
  jobs: (query) => request("GET", "/v1/jobs", { query }),
  cancel: (id) => request("POST", `/v1/jobs/${encodeURIComponent(id)}/cancel`),
  feedback: (id, rating, comment) =>
    request("POST", `/v1/jobs/${encodeURIComponent(id)}/feedback`, {
      body: comment ? { rating, comment } : { rating },
    }),
  stats: (query) => request("GET", "/v1/stats", { query }),
};
