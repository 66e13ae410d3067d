-- Job table of pygeoapi's PostgreSQL process manager (pygeoapi.process.manager.postgresql),
-- so that several API replicas share one job list. Run once at database creation.
CREATE TABLE IF NOT EXISTS public.jobs (
    type character varying DEFAULT 'process' NOT NULL,
    process_id character varying NOT NULL,
    identifier character varying NOT NULL PRIMARY KEY,
    status character varying NOT NULL,
    location character varying,
    mimetype character varying,
    created timestamp without time zone,
    started timestamp without time zone,
    finished timestamp without time zone,
    updated timestamp without time zone,
    progress integer DEFAULT 0 NOT NULL,
    message character varying
);
