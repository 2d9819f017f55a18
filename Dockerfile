# musclenode: CPU image. Build: docker build -t musclenode .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node node
COPY inference inference
COPY reports reports
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/musclenode musclenode \
    && mkdir -p /var/lib/musclenode && chown musclenode /var/lib/musclenode
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER musclenode
ENV MUSCLENODE_DATA=/var/lib/musclenode MUSCLENODE_PORT=11112
VOLUME /var/lib/musclenode
EXPOSE 11112
HEALTHCHECK --interval=30s --timeout=10s CMD musclenode echo --host 127.0.0.1 || exit 1
CMD ["musclenode", "serve"]
