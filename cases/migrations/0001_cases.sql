-- The case store: one case per alert (alert_id), the EMVS AMS workflow enforced here, in the
-- database, and an append-only audit trail. Applied once, in order, by cases/schema.py.

CREATE TABLE case_transitions (
    from_status     text NOT NULL,
    to_status       text NOT NULL,
    reason_required boolean NOT NULL,
    -- closed -> new only reopens a case the stream closed (its alert withdrawn, then raised again)
    only_if_closure text,
    PRIMARY KEY (from_status, to_status)
);

INSERT INTO case_transitions VALUES
    ('new',           'seen',          true,  NULL),
    ('new',           'investigating', false, NULL),
    ('new',           'closed',        true,  NULL),
    ('seen',          'investigating', false, NULL),
    ('seen',          'closed',        true,  NULL),
    ('investigating', 'escalated',     true,  NULL),
    ('investigating', 'closed',        true,  NULL),
    ('escalated',     'investigating', false, NULL),
    ('escalated',     'closed',        true,  NULL),
    ('closed',        'new',           true,  'withdrawn');

CREATE TABLE cases (
    alert_id        text PRIMARY KEY CHECK (alert_id ~ '^[0-9a-f]{24}$'),
    rule            text NOT NULL,
    severity        text NOT NULL CHECK (severity IN ('critical', 'high', 'medium', 'low')),
    institution     text NOT NULL,
    region          text,
    product         text,
    code            text,
    settlement_id   text,
    occurred_at     timestamptz NOT NULL,
    detected_at     timestamptz NOT NULL,
    opened_at       timestamptz NOT NULL DEFAULT now(),
    alert           jsonb NOT NULL,       -- the alert's last message
    standing        jsonb,                -- its last standing message (a withdrawal keeps it)
    withdrawn       boolean NOT NULL DEFAULT false,
    status          text NOT NULL DEFAULT 'new'
                    CHECK (status IN ('new', 'seen', 'investigating', 'escalated', 'closed')),
    closure_reason  text CHECK (closure_reason IN ('confirmed_fraud', 'process_error',
                    'scanner_fault', 'upload_error', 'duplicate', 'withdrawn', 'other')),
    closure_comment text CHECK (char_length(closure_comment) <= 500),
    duplicate_of    text REFERENCES cases (alert_id),
    assignee        text,
    version         integer NOT NULL DEFAULT 1,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    closed_at       timestamptz,
    CHECK ((status = 'closed') = (closure_reason IS NOT NULL)),
    CHECK (closure_reason IS DISTINCT FROM 'other' OR closure_comment IS NOT NULL),
    CHECK (closure_reason IS DISTINCT FROM 'duplicate' OR duplicate_of IS NOT NULL)
);

CREATE INDEX cases_list ON cases (detected_at DESC, alert_id DESC);
CREATE INDEX cases_institution ON cases (institution, detected_at DESC);
CREATE INDEX cases_open ON cases (status, detected_at) WHERE status <> 'closed';

CREATE TABLE case_audit (
    id          bigserial PRIMARY KEY,
    alert_id    text NOT NULL REFERENCES cases (alert_id),
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor       text NOT NULL CHECK (actor <> ''),
    action      text NOT NULL CHECK (action IN ('opened', 'transition', 'assign')),
    from_status text,
    to_status   text,
    reason      text,
    detail      jsonb
);

CREATE INDEX case_audit_case ON case_audit (alert_id, id);

-- The trail is append-only.
CREATE FUNCTION case_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'case_audit is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER case_audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON case_audit
    FOR EACH STATEMENT EXECUTE FUNCTION case_audit_append_only();

-- A status changes only through case_transition(), which checks the move and writes the trail.
CREATE FUNCTION cases_status_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status
       AND current_setting('tracewatch.transition', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'case %: a status changes only through case_transition()', OLD.alert_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER cases_status_guard BEFORE UPDATE ON cases
    FOR EACH ROW EXECUTE FUNCTION cases_status_guard();

-- Move one case. SQLSTATE TW404: no such case; TW409: another change came first (version);
-- TW422: the move or its reason is not allowed. Concurrent calls queue on the row lock.
CREATE FUNCTION case_transition(
    p_alert_id text, p_to text, p_actor text, p_reason text,
    p_closure text DEFAULT NULL, p_comment text DEFAULT NULL,
    p_version integer DEFAULT NULL, p_duplicate_of text DEFAULT NULL
) RETURNS cases LANGUAGE plpgsql AS $$
DECLARE
    c cases;
    move case_transitions;
BEGIN
    SELECT * INTO c FROM cases WHERE alert_id = p_alert_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no case %', p_alert_id USING ERRCODE = 'TW404';
    END IF;
    IF p_version IS NOT NULL AND c.version <> p_version THEN
        RAISE EXCEPTION 'case % changed meanwhile: version % now, % expected',
            p_alert_id, c.version, p_version USING ERRCODE = 'TW409';
    END IF;
    SELECT * INTO move FROM case_transitions WHERE from_status = c.status AND to_status = p_to;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'case %: % -> % is not allowed', p_alert_id, c.status, p_to
            USING ERRCODE = 'TW422';
    END IF;
    IF move.only_if_closure IS NOT NULL AND c.closure_reason IS DISTINCT FROM move.only_if_closure THEN
        RAISE EXCEPTION 'case %: only a case closed as % reopens (this one: %)',
            p_alert_id, move.only_if_closure, c.closure_reason USING ERRCODE = 'TW422';
    END IF;
    IF move.reason_required AND coalesce(btrim(p_reason), '') = '' THEN
        RAISE EXCEPTION 'case %: % -> % needs a reason', p_alert_id, c.status, p_to
            USING ERRCODE = 'TW422';
    END IF;
    IF p_to = 'closed' AND p_closure IS NULL THEN
        RAISE EXCEPTION 'case %: closing needs a closure reason', p_alert_id USING ERRCODE = 'TW422';
    END IF;
    PERFORM set_config('tracewatch.transition', 'on', true);
    UPDATE cases SET
        status = p_to,
        closure_reason = CASE WHEN p_to = 'closed' THEN p_closure END,
        closure_comment = CASE WHEN p_to = 'closed' THEN p_comment END,
        duplicate_of = CASE WHEN p_to = 'closed' THEN p_duplicate_of END,
        closed_at = CASE WHEN p_to = 'closed' THEN now() END,
        version = version + 1,
        updated_at = now()
    WHERE alert_id = p_alert_id
    RETURNING * INTO c;
    PERFORM set_config('tracewatch.transition', '', true);
    INSERT INTO case_audit (alert_id, actor, action, from_status, to_status, reason, detail)
    VALUES (p_alert_id, p_actor, 'transition', move.from_status, p_to, p_reason,
            jsonb_strip_nulls(jsonb_build_object('closure_reason', p_closure,
                'comment', p_comment, 'duplicate_of', p_duplicate_of)));
    RETURN c;
END $$;

-- Where each alerts-topic partition's sink has got to, committed with what it wrote: a
-- redelivered message (a crash after this commit, before Kafka's) is recognised and skipped.
CREATE TABLE sink_offsets (
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);

-- One alerts-topic message into the store: a new case, or the case's alert updated; a
-- withdrawal closes an open case (`withdrawn`), the alert raised again reopens a case the
-- stream had closed. Applied in each partition's offset order, so redelivery converges.
CREATE FUNCTION case_record_alert(p jsonb, p_region text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    c cases;
    gone boolean := coalesce(p->>'status', '') = 'withdrawn';
BEGIN
    INSERT INTO cases (alert_id, rule, severity, institution, region, product, code,
                       settlement_id, occurred_at, detected_at, alert, standing, withdrawn)
    VALUES (p->>'alert_id', p->>'rule', p->>'severity', p->>'institution', p_region,
            p->>'product', p->>'code', p->>'settlement_id', (p->>'occurred_at')::timestamptz,
            (p->>'detected_at')::timestamptz, p, CASE WHEN gone THEN NULL ELSE p END, gone)
    ON CONFLICT (alert_id) DO NOTHING;
    IF FOUND THEN
        INSERT INTO case_audit (alert_id, actor, action, to_status, reason)
        VALUES (p->>'alert_id', 'stream', 'opened', 'new', p->>'rule');
        IF gone THEN
            PERFORM case_transition(p->>'alert_id', 'closed', 'stream',
                'alert withdrawn: ' || coalesce(p->'evidence'->>'why', ''), 'withdrawn');
        END IF;
        RETURN;
    END IF;
    UPDATE cases SET
        alert = p,
        standing = CASE WHEN gone THEN standing ELSE p END,
        withdrawn = gone,
        region = coalesce(region, p_region),
        detected_at = (p->>'detected_at')::timestamptz,
        updated_at = now()
    WHERE alert_id = p->>'alert_id'
    RETURNING * INTO c;
    IF gone AND c.status <> 'closed' THEN
        PERFORM case_transition(c.alert_id, 'closed', 'stream',
            'alert withdrawn: ' || coalesce(p->'evidence'->>'why', ''), 'withdrawn');
    ELSIF NOT gone AND c.status = 'closed' AND c.closure_reason = 'withdrawn' THEN
        PERFORM case_transition(c.alert_id, 'new', 'stream', 'alert raised again');
    END IF;
END $$;
