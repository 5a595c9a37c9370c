"""Google Cloud Storage on this machine, for tests: gs://BUCKET/... that TensorFlow and Orbax reach offline.

Three clients touch a gs:// workdir, and each finds its server its own way:

- TensorStore (Orbax's arrays, the workdir's lock) reads TENSORSTORE_GCS_HTTP_URL: pointed
  straight at the emulator.
- google-cloud-storage (Orbax asks it whether the bucket has a hierarchical namespace) reads
  STORAGE_EMULATOR_HOST, likewise.
- TensorFlow's GCS file system (tf.io.gfile, so etils.epath, TensorBoard, TFDS and tf.data)
  has https://www.googleapis.com and https://storage.googleapis.com built in. Its HTTP client
  (libcurl) honours `https_proxy` and `CURL_CA_BUNDLE`, so its requests go to a local proxy
  that answers CONNECT for any host, ends TLS with a certificate from a throw-away
  certificate authority (trustme) that only these processes trust, and hands the plain
  HTTP to the emulator; the emulator's own http:// upload URLs go through it as well.
  No request leaves the machine.
- TensorFlow and TensorStore take GOOGLE_AUTH_TOKEN_FOR_TESTING as their credentials (the
  emulator checks none).

The emulator is gcp-storage-emulator (JSON and XML API, resumable uploads, rewrite, ranges;
in memory; one request at a time), with the four gaps below closed. It does not enforce
generation preconditions (ifGenerationMatch): that matters only to concurrent writers of one
object, which these tests do not have.
"""
import contextlib
import logging
import os
import select
import socket
import socketserver
import ssl
import tempfile
import threading

import trustme
from gcp_storage_emulator.handlers import objects as emulator_objects
from gcp_storage_emulator import server as emulator_server

# Gaps of the emulator that TensorFlow's and TensorStore's clients run into, closed here:
_emulator_media_upload = emulator_objects._media_upload  # pylint: disable=protected-access
_emulator_read_raw_data = emulator_server._read_raw_data  # pylint: disable=protected-access


def _read_raw_data_chunked_first(request_handler):
  """TensorFlow sends `Transfer-Encoding: chunked` with a Content-Length; HTTP/1.1 (and GCS)
  read the chunks, the emulator read the Content-Length bytes, chunk headers included."""
  if 'chunked' in (request_handler.headers.get('Transfer-Encoding') or '').lower():
    del request_handler.headers['Content-Length']
  return _emulator_read_raw_data(request_handler)


def _media_upload_allowing_empty(request, response, storage):
  """The emulator reads an empty body as None and fails; TensorFlow uploads empty objects
  (the `folder/` markers of makedirs, empty files)."""
  if request.data is None:
    request._data = b''  # pylint: disable=protected-access
  return _emulator_media_upload(request, response, storage)


_emulator_download = emulator_objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  """GCS names the object's generation in x-goog-generation on every download; TensorStore's
  conditional writes (OCDBT's manifest) depend on it, and the emulator leaves it out."""
  result = _emulator_download(request, response, storage, *args, **kwargs)
  if response.status.value in (200, 206):
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = obj['generation']
    response['x-goog-metageneration'] = obj.get('metageneration', '1')
  return result


def _storage_layout(request, response, storage):
  """GET /storage/v1/b/BUCKET/storageLayout, which TensorFlow asks before renaming a folder
  (hierarchical namespace or not); the emulator has no such route: a flat bucket."""
  del storage
  response.json({'kind': 'storage#storageLayout', 'bucket': request.params['bucket_name'],
                 'location': 'US', 'locationType': 'multi-region',
                 'hierarchicalNamespace': {'enabled': False}})


emulator_objects._media_upload = _media_upload_allowing_empty  # pylint: disable=protected-access
emulator_server._read_raw_data = _read_raw_data_chunked_first  # pylint: disable=protected-access
emulator_objects.download = _download_with_generation  # objects.get calls it by name ...
emulator_server.HANDLERS = (  # ... and the routes hold it.
    (r'^/storage/v1/b/(?P<bucket_name>[-.\w]+)/storageLayout$',
     {emulator_server.GET: _storage_layout}),
    *((pattern, {method: _download_with_generation if handler is _emulator_download else handler
                 for method, handler in handlers.items()})
      for pattern, handlers in emulator_server.HANDLERS))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _TlsTerminatingProxy(socketserver.ThreadingTCPServer):
  """Answers `CONNECT host:443`, ends TLS as that host, relays plain HTTP to the emulator."""
  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, emulator_port: int, tls_context: ssl.SSLContext):
    self.emulator_port = emulator_port
    self.tls_context = tls_context
    super().__init__(('127.0.0.1', 0), _ProxyConnection)


class _ProxyConnection(socketserver.BaseRequestHandler):

  def handle(self):
    client = self.request
    head = b''
    while b'\r\n\r\n' not in head:
      chunk = client.recv(4096)
      if not chunk:
        return
      head += chunk
    if not head.startswith(b'CONNECT '):  # Plain http://host/... (the emulator's upload URLs).
      method, target, rest = head.split(b' ', 2)
      if target.startswith(b'http://'):  # Absolute form, as to a proxy: the emulator wants /path.
        target = b'/' + target.split(b'/', 3)[3]
      with socket.create_connection(('127.0.0.1', self.server.emulator_port)) as upstream:
        upstream.sendall(b' '.join((method, target, rest)))
        _relay(client, upstream)
      return
    client.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
    try:
      tls = self.server.tls_context.wrap_socket(client, server_side=True)
    except (ssl.SSLError, OSError):
      return
    with tls, socket.create_connection(('127.0.0.1', self.server.emulator_port)) as upstream:
      _relay(tls, upstream)


def _relay(tls: socket.socket, upstream: socket.socket) -> None:
  """Copies bytes both ways until either side closes (one thread: SSL objects are not shared)."""
  tls.setblocking(False)
  upstream.setblocking(False)
  while True:
    if not (isinstance(tls, ssl.SSLSocket) and tls.pending()):
      readable, _, _ = select.select([tls, upstream], [], [], 60)
      if not readable:
        return
    else:
      readable = [tls]
    for source in readable:
      target = upstream if source is tls else tls
      try:
        data = source.recv(1 << 16)
      except (ssl.SSLWantReadError, BlockingIOError):
        continue
      except (ssl.SSLError, OSError):
        return
      if not data:
        return
      target.setblocking(True)
      try:
        target.sendall(data)
      except OSError:
        return
      finally:
        target.setblocking(False)


@contextlib.contextmanager
def running(bucket: str = 'bucket'):
  """Starts the emulator (with `bucket`) and the proxy; yields the environment clients need."""
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)  # Each 404 is an error.
  emulator_port = _free_port()
  emulator = emulator_server.create_server('127.0.0.1', emulator_port, in_memory=True, default_bucket=bucket)
  emulator.start()
  authority = trustme.CA()
  certificate = authority.issue_cert('www.googleapis.com', 'storage.googleapis.com',
                                     'oauth2.googleapis.com')
  tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
  certificate.configure_cert(tls_context)
  proxy = _TlsTerminatingProxy(emulator_port, tls_context)
  threading.Thread(target=proxy.serve_forever, daemon=True).start()
  with tempfile.TemporaryDirectory() as folder:
    ca_file = os.path.join(folder, 'ca.pem')
    authority.cert_pem.write_to_path(ca_file)
    proxy_url = f'http://127.0.0.1:{proxy.server_address[1]}'
    yield {
        'https_proxy': proxy_url, 'HTTPS_PROXY': proxy_url,
        'http_proxy': proxy_url, 'HTTP_PROXY': proxy_url, 'ALL_PROXY': '', 'all_proxy': '',
        'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': ca_file,
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator-needs-no-token',
        'GCS_RETRY_CONFIG_MAX_RETRIES': '2',  # TensorFlow: fail in seconds, not minutes.
        'NO_GCE_CHECK': 'true',  # TensorFlow: do not look for a GCE metadata server.
        'GCE_METADATA_HOST': '127.0.0.1:1', 'GCE_METADATA_ROOT': '127.0.0.1:1',
        'TENSORSTORE_GCS_HTTP_URL': f'http://127.0.0.1:{emulator_port}',
        'STORAGE_EMULATOR_HOST': f'http://127.0.0.1:{emulator_port}',  # gcsfs, google-cloud-storage.
    }
    proxy.shutdown()
    proxy.server_close()
    emulator.stop()
