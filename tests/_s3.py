"""moto's S3 server on 127.0.0.1 with the environment a user would set for S3 or MinIO (endpoint and credentials), for the tests of runs on a store."""
import logging, os
from contextlib import contextmanager


@contextmanager
def moto_s3(*buckets):
    "moto's S3 server on 127.0.0.1, `buckets` made, `AWS_ENDPOINT_URL` and the credentials set in the environment (restored at the end); yields the endpoint."
    from moto.server import ThreadedMotoServer
    logging.getLogger('werkzeug').setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import urllib.request  # moto's state is per process, not per server: a module's server starts empty, whoever ran before
    urllib.request.urlopen(urllib.request.Request(f'http://{host}:{port}/moto-api/reset', method='POST'), timeout=10).read()
    env = dict(AWS_ENDPOINT_URL=f'http://{host}:{port}', AWS_ACCESS_KEY_ID='testing', AWS_SECRET_ACCESS_KEY='testing',
               AWS_DEFAULT_REGION='us-east-1', AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    old = {k: os.environ.get(k) for k in [*env, 'AWS_ENDPOINT_URL_S3', 'AWS_PROFILE']}
    os.environ.update(env); os.environ.pop('AWS_ENDPOINT_URL_S3', None); os.environ.pop('AWS_PROFILE', None)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()  # a filesystem made with no options keeps the endpoint the environment had then
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        for b in buckets: fs.mkdir(b)
        yield env['AWS_ENDPOINT_URL']
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()  # nor may a later test reach this server through one
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v


def s3_fixtures(bucket:str):
    "A test module's `s3` (moto's server for the module, `bucket` made; yields the endpoint) and `run_url` (a fresh prefix of the bucket per test) fixtures."
    import uuid, pytest

    @pytest.fixture(scope='module')
    def s3():
        with moto_s3(bucket) as endpoint: yield endpoint

    @pytest.fixture
    def run_url(s3): return f's3://{bucket}/run-{uuid.uuid4().hex[:8]}'

    return s3, run_url
