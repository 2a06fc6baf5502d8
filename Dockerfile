# One image for every role: the CLI, Celery workers, beat, the tracker and Flower.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 mailer
WORKDIR /home/mailer

# The dependencies first, from pyproject.toml alone: a code change reuses this layer.
COPY pyproject.toml /tmp/build/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/build/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/build/requirements.txt \
    && pip install --no-cache-dir -r /tmp/build/requirements.txt "flower>=2.0"

# Then mailer itself, a normal (non-editable) install: the wheel carries the templates.
COPY README.md /tmp/build/
COPY mailer /tmp/build/mailer
COPY worker /tmp/build/worker
COPY templates /tmp/build/templates
RUN pip install --no-cache-dir --no-deps /tmp/build && rm -rf /tmp/build

USER mailer
ENV MAILER_DATABASE_URL=postgresql://mailer@postgres:5432/mailer \
    MAILER_BROKER_URL=redis://redis:6379/0
ENTRYPOINT ["mailer"]
CMD ["--help"]
